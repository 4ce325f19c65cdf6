"""The app tests' real server, serving the tiny random-weight checkpoints of tests/conftest.py."""

import pytest
from service_helpers import app_command, running_server


@pytest.fixture(scope="session")
def server(checkpoints, tmp_path_factory):
    """One real server for the network tests: 4 running and 2 queued per model."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"QUILL_MAX_RUNNING": "4", "QUILL_MAX_QUEUED": "2"}
    with running_server(app_command([checkpoints["tiny-gpt"], checkpoints["tiny-lstm"]]), env, log) as s:
        yield s
