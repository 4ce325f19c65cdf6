"""SIGTERM to `python -m app` while ten streams are live: it drains, then exits 0."""
import asyncio
import time

import httpx
import pytest
from load_helpers import LONG, SSEReader, open_stream, real_server
from service_helpers import app_command

pytestmark = [pytest.mark.server, pytest.mark.slow]

DRAIN_TIMEOUT = 3.0
SHORT, LONG_STREAMS = 5, 5  # streams that can finish within the drain, and streams that cannot


def test_sigterm_with_ten_live_streams_refuses_new_work_ends_every_stream_in_time_and_exits_0(checkpoints, tmp_path):
    env = {"QUILL_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT), "QUILL_MAX_RUNNING": "16"}
    with real_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server:

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                bodies = [{"prompt": "Hi", "max_new_tokens": 50}] * SHORT + \
                         [{"prompt": "Hi", "max_new_tokens": LONG}] * LONG_STREAMS
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
        assert name in ("done", "error"), (name, data)
        assert name == "done" or data["error"]["message"]
    assert all(name == "done" for (name, _), _ in ends[:SHORT])  # they had time to finish
    last_end = max(seconds for _, seconds in ends)
    print(f"\n/ready 503 {ready_after * 1000:.0f} ms after SIGTERM; "
          f"streams ended: {sum(name == 'done' for (name, _), _ in ends)} done, "
          f"{sum(name == 'error' for (name, _), _ in ends)} with an error event, the last {last_end:.2f} s "
          f"after SIGTERM (drain timeout {DRAIN_TIMEOUT} s); exit code {code} after {exited_after:.2f} s")
    assert ready_after < 1.0
    assert last_end < DRAIN_TIMEOUT + 2
    assert code == 0
