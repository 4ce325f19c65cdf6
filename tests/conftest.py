"""Fixtures shared by every test file. Pytest puts this folder on sys.path, so the tests import
the shared helpers (helpers, service_helpers, load_helpers) by name."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from service_helpers import write_checkpoints

# Two busy cores: one intra-op thread per process keeps tests and subprocesses from fighting.
torch.set_num_threads(1)
# The apps that tests build in this process run their engines in a thread of it (quick to start, and their
# internals can be patched); the servers tests start as a user would keep the default, a child process.
os.environ["QUILL_ENGINE_PROCESS"] = "0"
# ... and decode eagerly: a background compile per app (a builder process each) would cost every test seconds of
# CPU. The servers tests start as a user would compile in the background, as a user's do (service_helpers).
os.environ["QUILL_COMPILE"] = "0"
# Compiled decode steps are kept under $XDG_CACHE_HOME (model/compiled.py): the tests' own, never the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="quill-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "A stitch in time saves nine, and a penny saved is a penny earned.",
]


@pytest.fixture
def corpus(tmp_path):
    """About 5 KB of deterministic UTF-8 text, enough for a 90/10 split at context 16."""
    text = "\n".join(LINES[(i * 7) % len(LINES)] for i in range(100)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"tiny-gpt", "tiny-lstm" (character models), "byte-gpt" (UTF-8 bytes), "bpe-gpt" (byte-level BPE)}:
    random-weight run directories."""
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))
