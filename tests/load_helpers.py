"""Helpers for the load tests: streams read over the network with asyncio, the server's RSS, percentiles."""

import asyncio
import contextlib
import time

from prometheus_client.parser import text_string_to_metric_families
from service_helpers import Server, app_command, metric, parse_sse

LONG = 2048  # the most tokens a request may ask for: far longer than any check takes

# `python -m app` whose engines take no step while the file named by the first argument exists: requests
# admitted meanwhile stay admitted, with nothing generated, for as long as a test needs on any machine.
HELD_ENGINE = """
import os, pathlib, runpy, sys, time
from model.engine import Engine
os.environ["QUILL_ENGINE_PROCESS"] = "0"  # the patched Engine must be the one that runs: in this process
hold, step = pathlib.Path(sys.argv.pop(1)), Engine.step
def held_step(self):
    while hold.exists():
        time.sleep(0.01)
    step(self)
Engine.step = held_step
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def held_engine_command(checkpoints, hold):
    """app_command's server, with its engines held while the file `hold` exists."""
    module, flags = app_command(checkpoints)[:2], app_command(checkpoints)[2:]
    assert module == ["-m", "app"], module
    return ["-c", HELD_ENGINE, str(hold), *flags]


@contextlib.contextmanager
def real_server(command, env=None, log_path=None):
    """A `python -m app` subprocess, ready; patient with its start, for machines busy with other work."""
    server = Server(command, env, log_path)
    try:
        yield server.wait_ready(timeout=600)
    finally:
        server.close()


def rss_mib(pid):
    """Resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def percentile(values, q):
    """The nearest-rank q-th percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def in_flight(metrics_text):
    return metric(metrics_text, "quill_requests_running") + metric(metrics_text, "quill_requests_queued")


def server_errors(metrics_text):
    """Requests answered (or ended) with a 5xx, by the server's own count; /ready's 503s are its answer while the
    server starts (python -m app answers on its port from the start), not errors."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "quill_requests_total"
        and sample.labels["status"].startswith("5")
        and sample.labels["route"] != "/ready"
    )


async def wait_idle(client, url, timeout):
    """True once no request runs or waits in any engine, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_flight((await client.get(url + "/metrics")).text) == 0:
            return True
        await asyncio.sleep(0.1)
    return False


class SSEReader:
    """The events of one streaming response, parsed as they arrive."""

    def __init__(self, response):
        self.response = response
        self.buffer = ""
        self.events = []
        self.chunks = response.aiter_text()

    async def next_event(self):
        """The next event, or None at the end of the stream."""
        while True:
            if "\n\n" in self.buffer:
                block, self.buffer = self.buffer.split("\n\n", 1)
                parsed = parse_sse(block)
                if parsed:
                    self.events += parsed
                    return parsed[0]
                continue
            try:
                self.buffer += (await self.chunks.__anext__()).replace("\r\n", "\n")
            except StopAsyncIteration:
                rest = parse_sse(self.buffer)
                self.buffer = ""
                self.events += rest
                return rest[0] if rest else None

    async def tokens(self, n):
        """Read until `n` token events have arrived (or the stream ends)."""
        seen = 0
        while seen < n:
            event = await self.next_event()
            if event is None:
                return
            seen += event[0] == "token"

    async def rest(self):
        while await self.next_event() is not None:
            pass
        return self.events


async def open_stream(client, url, body):
    """POST /generate as a stream; the response is open, nothing of its body is read yet."""
    return await client.send(client.build_request("POST", url + "/generate", json=body), stream=True)
