"""Clients that stop reading: their streams are cut after the send timeout, and memory stays bounded.

On loopback the kernel absorbs a whole stream (at most ~450 KB, with a send buffer that grows to 4 MB),
so a real socket never blocks the server's sends; the timeout is proved in-process, with a client whose
buffers are full, and the network test shows what a real slow reader costs the server.
"""

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
from load_helpers import LONG, in_flight, real_server, rss_mib
from service_helpers import app_command, wait_until

from app.main import create_app
from app.settings import Settings

SEND_TIMEOUT = 1.0
STUCK_CLIENTS = 50
RSS_BOUND_MIB = 32


def request_scope(path, body):
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"quill"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("quill", 80),
        "state": {},
    }


async def stuck_client(app, path, body, readable_messages=3):
    """Serve one request to a client that reads `readable_messages` messages and then nothing: every later
    send blocks, as on a socket whose buffers are full. Return how long the app took to give up."""
    sent, request_read = 0, False

    async def receive():
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": body}
        await asyncio.Event().wait()  # the client neither sends nor hangs up

    async def send(message):
        nonlocal sent
        sent += 1
        if sent > readable_messages:
            await asyncio.Event().wait()

    started = time.monotonic()
    await app(request_scope(path, body), receive, send)  # returns cut short; the server closes the connection
    return time.monotonic() - started


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"prompt": "Hello", "max_new_tokens": LONG}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": LONG, "stream": True}),
    ],
    ids=["sse", "openai"],
)
def test_client_that_stops_reading_is_cut_after_the_send_timeout_and_frees_its_slot(checkpoints, path, body):
    settings = Settings(
        _env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], send_timeout=SEND_TIMEOUT, max_queued=STUCK_CLIENTS
    )
    app = create_app(settings)
    engine = lambda: app.state.service.models["tiny-gpt"].engine  # noqa: E731

    async def run():
        async with app.router.lifespan_context(app):
            before = rss_mib(os.getpid())
            waits = await asyncio.gather(
                *[stuck_client(app, path, json.dumps(body).encode()) for _ in range(STUCK_CLIENTS)]
            )
            for _ in range(100):  # the engine thread notices the cancellations between steps
                if engine().counts() == (0, 0):
                    break
                await asyncio.sleep(0.05)
            return waits, engine().counts(), rss_mib(os.getpid()) - before

    waits, counts, growth = asyncio.run(run())
    print(
        f"\n{STUCK_CLIENTS} stuck clients cut after {min(waits):.2f}-{max(waits):.2f} s "
        f"(send timeout {SEND_TIMEOUT} s); RSS growth {growth:+.1f} MiB"
    )
    assert all(SEND_TIMEOUT <= w < SEND_TIMEOUT + 10 for w in waits)
    assert counts == (0, 0)
    assert growth < RSS_BOUND_MIB


def slow_reader(port, body):
    """A real client that sends its request and then never reads, with a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: quill\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


@pytest.mark.long
@pytest.mark.server
def test_real_clients_that_stop_reading_cost_bounded_memory_and_do_not_stall_others(checkpoints, tmp_path):
    env = {"QUILL_SEND_TIMEOUT": str(SEND_TIMEOUT)}
    with real_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server:
        httpx.post(
            server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": LONG, "stream": False}, timeout=300
        )  # warm-up at full length
        before = rss_mib(server.proc.pid)
        body = json.dumps({"prompt": "Hello", "max_tokens": LONG, "stream": True}).encode()
        readers = [slow_reader(server.port, body) for _ in range(20)]
        try:
            started = time.monotonic()
            r = httpx.post(
                server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 5, "stream": False}, timeout=60
            )
            other = time.monotonic() - started
            assert r.status_code == 200
            assert wait_until(lambda: in_flight(server.metrics()) == 0, timeout=300)
            growth = rss_mib(server.proc.pid) - before
        finally:
            for sock in readers:
                sock.close()
        print(
            f"\n20 real slow readers: a normal request meanwhile took {other:.2f} s; "
            f"server RSS growth {growth:+.1f} MiB"
        )
        assert growth < RSS_BOUND_MIB
