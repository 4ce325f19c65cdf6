"""Stopping `python -m app`: SIGTERM or Ctrl-C drains, a second Ctrl-C ends every stream at once, and every
stream that did not finish ends with an `error` event (code server_shutdown), never cut mid-response."""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from load_helpers import LONG, SSEReader, open_stream, real_server
from service_helpers import REPO, app_command, free_port, parse_sse, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

DRAIN_TIMEOUT = 3.0
SHORT, LONG_STREAMS = 5, 5  # streams that can finish within the drain, and streams that cannot
SHUTDOWN = {"message": "the server is shutting down", "type": "unavailable", "param": None, "code": "server_shutdown"}

# `python -m app` whose engine sleeps before each step: a LONG stream takes over a minute on any machine,
# so it is still running whenever a test stops the server.
SLOW_ENGINE = """
import os, runpy, time
from model.engine import Engine
os.environ["QUILL_ENGINE_PROCESS"] = "0"  # the patched Engine must be the one that runs: in this process
step = Engine.step
def slow_step(self):
    time.sleep(0.03)
    step(self)
Engine.step = slow_step
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def slow_engine_command(checkpoint):
    return ["-c", SLOW_ENGINE, "--checkpoint", str(checkpoint)]


class Stream:
    """A streaming /generate, read up to its first token; `events()` reads the rest to the response's end
    (httpx raises if the server cuts the response short)."""

    def __init__(self, client, url):
        request = client.build_request("POST", url + "/generate", json={"prompt": "Hi", "max_new_tokens": LONG})
        self.response = client.send(request, stream=True)
        self.chunks, self.text = self.response.iter_text(), ""
        while "event: token" not in self.text:
            self.text += next(self.chunks)

    def events(self):
        self.text += "".join(self.chunks)
        return parse_sse(self.text)


def assert_ended_by_shutdown(events):
    assert events[0][0] == "token" and events[-1] == ("error", {"error": SHUTDOWN}), events[-3:]


def ready_status(url):
    try:
        return httpx.get(url + "/ready", timeout=5).status_code
    except httpx.TransportError:
        return None


def test_sigterm_with_ten_live_streams_refuses_new_work_ends_every_stream_in_time_and_exits_0(checkpoints, tmp_path):
    env = {"QUILL_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT), "QUILL_MAX_RUNNING": "16"}
    with real_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server:

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                bodies = [{"prompt": "Hi", "max_new_tokens": 50}] * SHORT + [
                    {"prompt": "Hi", "max_new_tokens": LONG}
                ] * LONG_STREAMS
                responses = [await open_stream(client, server.url, body) for body in bodies]
                readers = [SSEReader(r) for r in responses]
                for reader in readers:
                    await reader.tokens(1)  # all ten are live

                server.terminate()
                signalled = time.monotonic()
                ready = await client.get(server.url + "/ready")
                ready_after = time.monotonic() - signalled
                refused = await client.post(server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 5})

                async def end(reader):
                    events = await reader.rest()
                    return events[-1], time.monotonic() - signalled

                ends = await asyncio.gather(*[end(reader) for reader in readers])
                for r in responses:
                    await r.aclose()
                return ready, ready_after, refused, ends, signalled

        ready, ready_after, refused, ends, signalled = asyncio.run(run())
        code = server.proc.wait(timeout=DRAIN_TIMEOUT + 30)
        exited_after = time.monotonic() - signalled

    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable"
    for (name, data), _ in ends:
        assert name == "done" or (name, data) == ("error", {"error": SHUTDOWN}), (name, data)
    assert all(name == "done" for (name, _), _ in ends[:SHORT])  # they had time to finish
    last_end = max(seconds for _, seconds in ends)
    print(
        f"\n/ready 503 {ready_after * 1000:.0f} ms after SIGTERM; "
        f"streams ended: {sum(name == 'done' for (name, _), _ in ends)} done, "
        f"{sum(name == 'error' for (name, _), _ in ends)} with an error event, the last {last_end:.2f} s "
        f"after SIGTERM (drain timeout {DRAIN_TIMEOUT} s); exit code {code} after {exited_after:.2f} s"
    )
    assert ready_after < 1.0
    assert last_end < DRAIN_TIMEOUT + 2
    assert code == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_streams_still_running_at_the_drain_timeout_end_with_a_server_shutdown_error(checkpoints, tmp_path):
    log = tmp_path / "server.log"
    with (
        real_server(slow_engine_command(checkpoints["tiny-gpt"]), {"QUILL_DRAIN_TIMEOUT": "1"}, log) as server,
        httpx.Client(timeout=60) as client,
    ):
        stream = Stream(client, server.url)
        server.terminate()
        assert_ended_by_shutdown(stream.events())
        assert server.proc.wait(timeout=60) == 0
    assert "Traceback" not in log.read_text()


def test_first_ctrl_c_says_it_drains_and_a_second_ends_every_stream_with_a_server_shutdown_error(checkpoints, tmp_path):
    log = tmp_path / "server.log"
    with (
        real_server(slow_engine_command(checkpoints["tiny-gpt"]), {"QUILL_DRAIN_TIMEOUT": "600"}, log) as server,
        httpx.Client(timeout=60) as client,
    ):
        streams = [Stream(client, server.url) for _ in range(2)]
        server.proc.send_signal(signal.SIGINT)
        line = "draining 2 streams, up to 600 s; Ctrl-C again to stop now"
        assert wait_until(lambda: line in log.read_text(), timeout=30), log.read_text()[-2000:]
        server.proc.send_signal(signal.SIGINT)
        for stream in streams:
            assert_ended_by_shutdown(stream.events())  # well before the 600 s drain timeout
        assert server.proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    assert text.count("draining") == 1


def test_sigterm_again_during_the_drain_changes_nothing(checkpoints, tmp_path):
    """What `make serve` does: SIGTERM to its process group reaches the server, and make forwards its own."""
    log = tmp_path / "server.log"
    with (
        real_server(slow_engine_command(checkpoints["tiny-gpt"]), {"QUILL_DRAIN_TIMEOUT": "5"}, log) as server,
        httpx.Client(timeout=60) as client,
    ):
        stream = Stream(client, server.url)
        server.terminate()
        assert wait_until(lambda: "draining" in log.read_text(), timeout=30)  # the first one was handled
        server.terminate()
        assert_ended_by_shutdown(stream.events())  # at the drain timeout, not cut short by the second
        assert server.proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "Traceback" not in text and text.count("draining") == 1, text[-3000:]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("times", [1, pytest.param(8, marks=pytest.mark.long)])
def test_sigterm_to_a_make_serve_process_group_drains_every_time(checkpoints, tmp_path, times):
    """`make serve`'s process group (make, and the server as its child), sent SIGTERM as a terminal or a
    supervisor would: each time the stream ends whole, the server logs one drain and no traceback."""
    (tmp_path / "slow_app.py").write_text(SLOW_ENGINE)
    (tmp_path / "Makefile").write_text("serve:\n\t$(PYTHON) slow_app.py\n")  # the real target's shape, less install
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "QUILL_DRAIN_TIMEOUT": "1",
        "QUILL_CHECKPOINTS": str(checkpoints["tiny-gpt"]),
    }
    for attempt in range(times):
        port, log = free_port(), tmp_path / f"make-{attempt}.log"
        url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            make = subprocess.Popen(
                ["make", "-s", "-C", str(tmp_path), "serve", f"PYTHON={sys.executable}"],
                env={**env, "QUILL_PORT": str(port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:

            def ready(make=make, log=log, url=url):
                assert make.poll() is None, log.read_text()[-3000:]
                return ready_status(url) == 200

            assert wait_until(ready, timeout=600, interval=0.2)
            with httpx.Client(timeout=60) as client:
                stream = Stream(client, url)
                os.killpg(make.pid, signal.SIGTERM)
                assert_ended_by_shutdown(stream.events())
            make.wait(timeout=60)
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()
        text = log.read_text()
        assert "Traceback" not in text and text.count("draining 1 stream,") == 1, (attempt, text[-3000:])
        assert "Finished server process" in text and not re.search(r"\] Error \d", text), (attempt, text[-3000:])
