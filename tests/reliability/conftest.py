"""Fixtures for the reliability tests: the service tests' tiny checkpoints and servers, reused."""

import sys
from pathlib import Path

import pytest

# The service tests' helpers (tiny checkpoints, a real server, SSE parsing) serve these tests too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from service_helpers import write_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"tiny-gpt", "tiny-lstm", "byte-gpt"}: random-weight run directories, as in tests/service."""
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))
