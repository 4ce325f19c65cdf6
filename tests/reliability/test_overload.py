"""Overload over the network: far more concurrent requests than one model admits (running + queued).
The engine is held (it takes no step) while the refusals go out, so the model stays full for exactly as
long as the test needs, however fast or busy the machine: every check is a count or a state."""

import asyncio
import time

import httpx
import pytest
from load_helpers import (
    LONG,
    SSEReader,
    held_engine_command,
    in_flight,
    open_stream,
    percentile,
    real_server,
    server_errors,
    wait_idle,
)
from service_helpers import metric

pytestmark = [pytest.mark.server, pytest.mark.slow]

RUNNING, QUEUED = 4, 4
BURST = 100  # refused requests, sent all at once while the model is full
ONE_BY_ONE = 50  # then refused requests sent one after another: the cost of one refusal, without queueing


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """(the server, its hold file): the engine takes no step while the file exists."""
    folder = tmp_path_factory.mktemp("overload")
    env = {"QUILL_MAX_RUNNING": str(RUNNING), "QUILL_MAX_QUEUED": str(QUEUED)}
    hold = folder / "hold"
    with real_server(held_engine_command([checkpoints["tiny-gpt"]], hold), env, folder / "server.log") as s:
        yield s, hold


async def timed_refusal(client, url):
    started = time.monotonic()
    response = await client.post(url + "/generate", json={"prompt": "Hi", "max_new_tokens": LONG})
    return response, time.monotonic() - started


def refusals(metrics_text):
    return metric(metrics_text, "quill_requests_total", route="/generate", status="429") or 0


def tokens(metrics_text):
    return metric(metrics_text, "quill_tokens_generated_total", model="tiny-gpt") or 0


def test_burst_beyond_capacity_gets_429_with_no_model_work_and_admitted_streams_complete(server):
    server, hold = server

    async def run():
        limits = httpx.Limits(max_connections=BURST + RUNNING + QUEUED + 10)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            hold.touch()
            try:
                admitted = [
                    await open_stream(client, server.url, {"prompt": "Hi", "max_new_tokens": LONG})
                    for _ in range(RUNNING + QUEUED)
                ]
                full = (await client.get(server.url + "/metrics")).text
                refused = await asyncio.gather(*[timed_refusal(client, server.url) for _ in range(BURST)])
                refused += [await timed_refusal(client, server.url) for _ in range(ONE_BY_ONE)]
                after = (await client.get(server.url + "/metrics")).text
            finally:
                hold.unlink()  # the engine runs again: the admitted streams may finish
            streams = await asyncio.gather(*[SSEReader(r).rest() for r in admitted])
            for r in admitted:
                await r.aclose()
            idle = await wait_idle(client, server.url, timeout=120)
            return admitted, full, refused, after, streams, idle, (await client.get(server.url + "/metrics")).text

    admitted, full, refused, after, streams, idle, metrics = asyncio.run(run())
    assert [r.status_code for r in admitted] == [200] * (RUNNING + QUEUED)
    # while held, the model stayed full and generated nothing: each refusal was decided without model work
    assert in_flight(full) == in_flight(after) == RUNNING + QUEUED
    assert tokens(after) == tokens(full) == 0
    assert [r.status_code for r, _ in refused] == [429] * (BURST + ONE_BY_ONE)
    # the server's own count (taken once a request has ended, so read after the streams, not while held)
    assert refusals(metrics) - refusals(full) == BURST + ONE_BY_ONE
    for r, _ in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    for events in streams:
        assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"
        assert sum(name == "token" for name, _ in events) == LONG
    assert tokens(metrics) == (RUNNING + QUEUED) * LONG
    assert idle and server_errors(metrics) == 0
    # what a refusal costs, for the record (make reliability prints it with -rP); timings decide nothing here
    burst, one_by_one = [s for _, s in refused[:BURST]], [s for _, s in refused[BURST:]]
    for name, seconds in (("at once", burst), ("one by one", one_by_one)):
        print(
            f"\n429 latency, {len(seconds)} {name}: p50 {percentile(seconds, 50) * 1000:.1f} ms, "
            f"p99 {percentile(seconds, 99) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms"
        )
