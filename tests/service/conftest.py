"""Fixtures for the service tests: tiny random-weight checkpoints (no trained model needed)."""

import pytest
from service_helpers import app_command, running_server, write_checkpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"tiny-gpt", "tiny-lstm" (character models), "byte-gpt" (UTF-8 bytes)}: run directories."""
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def server(checkpoints, tmp_path_factory):
    """One real server for the network tests: 4 running and 2 queued per model."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"QUILL_MAX_RUNNING": "4", "QUILL_MAX_QUEUED": "2"}
    with running_server(app_command([checkpoints["tiny-gpt"], checkpoints["tiny-lstm"]]), env, log) as s:
        yield s
