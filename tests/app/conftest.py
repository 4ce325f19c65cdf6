"""The app tests' real server, serving the tiny random-weight checkpoints of tests/conftest.py."""

import pytest
from service_helpers import app_command, running_server


@pytest.fixture(scope="session")
def server(checkpoints, tmp_path_factory):
    """One real server for the network tests, as a user starts it: 4 running and 2 queued per model."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"QUILL_MAX_RUNNING": "4", "QUILL_MAX_QUEUED": "2"}
    with running_server(app_command([checkpoints["tiny-gpt"], checkpoints["tiny-lstm"]]), env, log) as s:
        yield s


@pytest.fixture(scope="session")
def thread_server(checkpoints, tmp_path_factory):
    """The same server with each engine in a thread of the server's process (QUILL_ENGINE_PROCESS=0)."""
    log = tmp_path_factory.mktemp("thread-server") / "server.log"
    env = {"QUILL_MAX_RUNNING": "4", "QUILL_MAX_QUEUED": "2", "QUILL_ENGINE_PROCESS": "0"}
    with running_server(app_command([checkpoints["tiny-gpt"], checkpoints["tiny-lstm"]]), env, log) as s:
        yield s


@pytest.fixture(params=["engine-process", "engine-thread"])
def any_server(request):
    """Each test that takes this runs against both servers: the engine in a process (the default), and in a thread."""
    return request.getfixturevalue("server" if request.param == "engine-process" else "thread_server")
