"""`python -m app.healthcheck`, the container HEALTHCHECK: 0 when /ready says 200, else 1."""

import os
import subprocess
import sys

import pytest
from service_helpers import REPO, free_port

pytestmark = [pytest.mark.server]


def healthcheck(port):
    env = {**os.environ, "PYTHONPATH": str(REPO), "QUILL_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "app.healthcheck"], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_when_the_server_is_ready(server):
    r = healthcheck(server.port)
    assert r.returncode == 0, r.stderr


def test_healthcheck_fails_saying_why_when_nothing_listens():
    r = healthcheck(free_port())
    assert r.returncode == 1
    assert "not ready" in r.stderr
