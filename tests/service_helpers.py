"""Helpers for the service tests: tiny checkpoints, SSE parsing, metrics, a real server."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import tiny_gpt, tiny_lstm
from prometheus_client.parser import text_string_to_metric_families

from model import BPETokenizer, ByteTokenizer, CharTokenizer, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
# Every character a test prompt uses; anything else is "not in the vocabulary".
TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n"
CONTEXT = 32


def write_checkpoints(root):
    """Random-weight checkpoints, one directory each (the directory names the model)."""
    chars, raw = CharTokenizer.from_text(TEXT), ByteTokenizer()
    bpe = BPETokenizer.train([TEXT * 20 + "the quick brown fox jumps over the lazy dog\n" * 50], vocab_size=300)
    made = {
        "tiny-gpt": (tiny_gpt(chars.vocab_size, context_size=CONTEXT), chars),
        "tiny-lstm": (tiny_lstm(chars.vocab_size), chars),
        "byte-gpt": (tiny_gpt(raw.vocab_size, context_size=CONTEXT), raw),
        "bpe-gpt": (tiny_gpt(bpe.vocab_size, context_size=CONTEXT), bpe),
    }
    for name, (model, tokenizer) in made.items():
        save_checkpoint(Path(root) / name / "model.safetensors", model, tokenizer, {})
    return {name: Path(root) / name for name in made}


def parse_sse(text):
    """Server-sent events as (event, data) pairs; data is JSON-decoded when it can be."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            joined = "\n".join(data)
            try:
                events.append((name, json.loads(joined)))
            except json.JSONDecodeError:
                events.append((name, joined))
    return events


def metric(text, name, **labels):
    """The value of one sample in a Prometheus exposition, or None when it is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def app_command(checkpoints):
    """`python -m app --checkpoint A --checkpoint B ...`, less the interpreter and the port."""
    return ["-m", "app", *[a for path in checkpoints for a in ("--checkpoint", str(path))]]


class Server:
    """A server in a subprocess on a free port, started as a user would start it."""

    def __init__(self, command, env=None, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server's engine where a user's would be (a child process), unless this test says otherwise:
        # tests/conftest.py sets QUILL_ENGINE_PROCESS=0 and QUILL_COMPILE=0 for the apps that tests build in their
        # own process; a server keeps the defaults (packages kept in the session's XDG_CACHE_HOME)
        inherited = {k: v for k, v in os.environ.items() if k not in ("QUILL_ENGINE_PROCESS", "QUILL_COMPILE")}
        env = {**inherited, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        self.log = open(log_path or os.devnull, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout=90):
        def ready():
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            try:
                return httpx.get(self.url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(ready, timeout, interval=0.2), "server not ready in time"
        return self

    def metrics(self):
        return httpx.get(self.url + "/metrics", timeout=10).text

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait_compiled(server, timeout=600):
    """Wait until /ready says every model's decode step is compiled for every batch size (compiling runs in the
    background after the server is ready); False if it did not in `timeout` seconds."""

    def compiled():
        steps = httpx.get(server.url + "/ready", timeout=5).json().get("compiled", {}).values()
        return all(s["compiled_batch_sizes"] == s["batch_sizes"] for s in steps)

    return wait_until(compiled, timeout, interval=0.5)


@contextlib.contextmanager
def running_server(command, env=None, log_path=None, ready_within=90):
    server = Server(command, env, log_path)
    try:
        yield server.wait_ready(ready_within)
    finally:
        server.close()
