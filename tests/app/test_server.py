"""A real `python -m app` over the network: streaming, disconnects, overload, SIGTERM."""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, app_command, metric, parse_sse, running_server, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

LONG = 2048  # the most a request may ask for: far longer than any check below takes


class Events:
    """The SSE events of a streaming response, read as they arrive."""

    def __init__(self, response):
        self.stream = self._parse(response.iter_text())

    @staticmethod
    def _parse(chunks):
        buffer = ""
        for chunk in chunks:
            *blocks, buffer = (buffer + chunk).replace("\r\n", "\n").split("\n\n")
            for block in blocks:
                yield from parse_sse(block)
        yield from parse_sse(buffer)

    def tokens(self, n):
        """Read until `n` token events have arrived; return the events read."""
        events = []
        for event in self.stream:
            events.append(event)
            if sum(name == "token" for name, _ in events) == n:
                break
        return events

    def rest(self):
        return list(self.stream)


def open_stream(client, url, **body):
    response = client.send(client.build_request("POST", url + "/generate", json=body), stream=True)
    assert response.status_code == 200, response.read()
    return response


def test_stream_arrives_over_the_network_as_events(any_server):
    with httpx.stream(
        "POST", any_server.url + "/generate", json={"prompt": "Hello", "max_new_tokens": 40, "seed": 1}, timeout=60
    ) as r:
        assert r.status_code == 200
        events = Events(r).rest()
    names = [name for name, _ in events]
    assert names == ["token"] * 40 + ["done"]
    done = events[-1][1]
    assert done["finish_reason"] == "length"
    assert done["text"] == "".join(data["text"] for _, data in events[:-1])


DISCONNECTING = {
    "sse": ("/generate", {"prompt": "Hello", "max_new_tokens": LONG}, {}),
    "text": ("/generate", {"prompt": "Hello", "max_new_tokens": LONG}, {"Accept": "text/plain"}),
    "openai": ("/v1/completions", {"prompt": "Hello", "max_tokens": LONG, "stream": True}, {}),
}


@pytest.mark.parametrize("kind", DISCONNECTING)
def test_client_that_disconnects_mid_stream_leaves_the_batch(any_server, kind):
    path, body, headers = DISCONNECTING[kind]
    tokens_before = metric(any_server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") or 0
    with httpx.stream("POST", any_server.url + path, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert next(r.iter_bytes())
    # leaving the block closed the connection, mid-stream

    def idle():
        text = any_server.metrics()
        return metric(text, "quill_requests_running") == 0 and metric(text, "quill_requests_queued") == 0

    assert wait_until(idle, timeout=5), "the abandoned request is still in the batch"
    generated = metric(any_server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") - tokens_before
    assert generated < LONG


WHOLE = {  # non-streamed: the client gives up waiting for the whole response
    "generate": ("/generate", {"prompt": "Hello", "max_new_tokens": LONG, "stream": False}, 1),
    "completions-n3": ("/v1/completions", {"prompt": "Hello", "max_tokens": LONG, "n": 3}, 3),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG}, 1),
}


@pytest.mark.parametrize("kind", WHOLE)
def test_client_that_stops_waiting_for_a_whole_response_frees_every_choice(any_server, kind):
    path, body, choices = WHOLE[kind]
    tokens_before = metric(any_server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") or 0
    with pytest.raises(httpx.ReadTimeout):
        # a tenth of a second: with its compiled step, tiny-gpt makes 2,048 tokens in about 0.3 s here
        httpx.post(any_server.url + path, json={**body, "temperature": 0}, timeout=httpx.Timeout(60, read=0.1))

    def idle():
        text = any_server.metrics()
        return metric(text, "quill_requests_running") == 0 and metric(text, "quill_requests_queued") == 0

    assert wait_until(idle, timeout=5), "the abandoned request is still in the batch"
    generated = metric(any_server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") - tokens_before
    assert generated < choices * LONG  # cut short: not every choice ran to its end


def test_overload_gets_429_at_once_and_admitted_streams_complete(any_server):
    # the any_server admits 4 running + 2 queued per model
    with httpx.Client(timeout=120) as client:
        admitted = [open_stream(client, any_server.url, prompt="Hi", max_new_tokens=LONG) for _ in range(6)]
        try:
            for _ in range(3):
                started = time.monotonic()
                r = client.post(any_server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 5})
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"]
                assert time.monotonic() - started < 2
            # the other model has its own limits
            other = client.post(
                any_server.url + "/generate",
                json={"prompt": "Hi", "max_new_tokens": 5, "model": "tiny-lstm", "stream": False},
            )
            assert other.status_code == 200
            for response in admitted:
                events = Events(response).rest()
                assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"
                assert sum(name == "token" for name, _ in events) == LONG
        finally:
            for response in admitted:
                response.close()


ENGINES = pytest.mark.parametrize(
    "engine_env", [{}, {"QUILL_ENGINE_PROCESS": "0"}], ids=["engine-process", "engine-thread"]
)


@ENGINES
def test_sigterm_drains_streams_in_flight_then_exits_zero(checkpoints, tmp_path, engine_env):
    drain_timeout = 2.0
    env = {"QUILL_DRAIN_TIMEOUT": str(drain_timeout), **engine_env}
    with (
        running_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server,
        httpx.Client(timeout=60) as client,
    ):
        long = Events(open_stream(client, server.url, prompt="Hi", max_new_tokens=LONG))
        short = Events(open_stream(client, server.url, prompt="Hi", max_new_tokens=200))
        assert long.tokens(1) and short.tokens(1)

        server.terminate()
        signalled = time.monotonic()
        ready = client.get(server.url + "/ready")
        assert ready.status_code == 503
        assert "draining" in ready.json()["error"]["message"]
        refused = client.post(server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 5})
        assert refused.status_code == 503

        short_end = short.rest()[-1]
        assert short_end[0] == "done", short_end  # it had time to finish
        long_end = long.rest()[-1]
        assert long_end[0] in ("done", "error"), long_end  # finished, or ended at the drain timeout
        if long_end[0] == "error":
            assert long_end[1]["error"]["message"]
        assert time.monotonic() - signalled < drain_timeout + 5

        assert server.proc.wait(timeout=drain_timeout + 20) == 0


@ENGINES
def test_ctrl_c_during_the_drain_stops_at_once(checkpoints, tmp_path, engine_env):
    env = {"QUILL_DRAIN_TIMEOUT": "60", **engine_env}
    with (
        running_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server,
        httpx.Client(timeout=60) as client,
    ):
        stream = Events(open_stream(client, server.url, prompt="Hi", max_new_tokens=LONG))
        assert stream.tokens(1)
        server.terminate()
        assert wait_until(lambda: client.get(server.url + "/ready").status_code == 503, timeout=5)
        server.proc.send_signal(signal.SIGINT)  # a second SIGTERM changes nothing (tests/reliability/test_sigterm.py)
        server.proc.wait(timeout=10)  # not the 60 s drain


def test_uvicorn_serves_app_main_with_settings_from_the_environment(checkpoints, tmp_path):
    env = {"QUILL_CHECKPOINTS": f"{checkpoints['tiny-lstm']},{checkpoints['tiny-gpt']}", "QUILL_API_KEY": "k"}
    with running_server(["-m", "uvicorn", "app.main:app"], env, tmp_path / "server.log") as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k"})
        assert [m["id"] for m in r.json()["data"]] == ["tiny-lstm", "tiny-gpt"]


def progress_until_built(server, sizes):
    """Each /ready answer's progress of tiny-gpt's compile, polled until every batch size is built."""
    seen = []

    def built():
        seen.append(httpx.get(server.url + "/ready", timeout=5).json()["compiled"]["tiny-gpt"])
        return seen[-1]["compiled_batch_sizes"] == sizes

    assert wait_until(built, timeout=600, interval=0.2), seen[-1:]
    return seen


def test_a_default_server_serves_at_once_compiles_in_the_background_and_keeps_what_it_built(
    server, checkpoints, tmp_path
):
    """No settings: the server is ready once its models are loaded and serves eagerly while each batch size's
    decode step compiles in the background; /ready says which are built so far; the text is the same before
    and after; a second start loads the kept packages and compiles nothing."""
    body = {"prompt": "Hello there", "max_new_tokens": 40, "temperature": 0, "stream": False}
    expected = httpx.post(server.url + "/generate", json=body, timeout=60).json()["text"]
    env = {"QUILL_MAX_RUNNING": "2", "QUILL_COMPILE_CACHE": str(tmp_path / "kept")}  # batch sizes 1 and 2
    first = ["compiling the decode step for batch sizes 1, 2 in the background"]  # ("compiled ..." when it ends)
    for start, says in enumerate([first, ["loaded the compiled decode step for batch sizes 1, 2"]]):
        log = tmp_path / f"server-{start}.log"
        s = Server(app_command([checkpoints["tiny-gpt"]]), env, log).wait_ready()
        try:
            during = httpx.post(s.url + "/generate", json=body, timeout=60).json()["text"]
            seen = progress_until_built(s, [1, 2])
            after = httpx.post(s.url + "/generate", json=body, timeout=60).json()["text"]
        finally:
            s.close()
        lines = [line.split("model tiny-gpt: ", 1)[1] for line in log.read_text().splitlines() if "decode step" in line]
        lines = [line for line in lines if not line.startswith("compiled the")]  # the builder's end: maybe not yet
        assert [line.split(" for batch sizes 1, 2")[0] for line in lines] == [line.split(" for")[0] for line in says]
        assert during == after == expected
        assert seen[-1] == {"compiled_batch_sizes": [1, 2], "batch_sizes": [1, 2]}
        if start == 0:  # ready before its steps were built, which /ready then told one by one
            assert seen[0]["compiled_batch_sizes"] != [1, 2]
            assert {"compiled_batch_sizes": [1], "batch_sizes": [1, 2]} in seen


def test_the_engine_in_a_process_streams_what_the_engine_in_a_thread_does(server, thread_server):
    body = {"prompt": "Hello there", "max_new_tokens": 40, "seed": 3, "top_k": 10, "stream": False}
    for model in ("tiny-gpt", "tiny-lstm"):
        thread, process = (
            httpx.post(s.url + "/generate", json={**body, "model": model}, timeout=60) for s in (thread_server, server)
        )
        assert process.status_code == thread.status_code == 200
        assert process.json()["text"] == thread.json()["text"]


def test_the_done_events_timings_add_up(any_server):
    """The engine process's admission time reaches the server: queue time and tokens/s count from it."""
    body = {"prompt": "Hi", "max_new_tokens": 30, "stream": False}
    timings = httpx.post(any_server.url + "/generate", json=body, timeout=60).json()["timings"]
    assert 0 <= timings["queue_s"] <= timings["time_to_first_token_s"] <= timings["total_s"]
    # counted from admission, which came before the first token: no faster than the 29 tokens after it allow
    after_first = timings["total_s"] - timings["time_to_first_token_s"]
    assert 0 < timings["tokens_per_s"] <= 30 / after_first * 1.01


def test_ctrl_c_at_the_engine_process_leaves_it_serving(server):
    """A terminal's Ctrl-C goes to the whole process group; the server drains, and the child ignores it."""
    tasks = Path(f"/proc/{server.proc.pid}/task").iterdir()  # a child belongs to the thread that started it
    children = [pid for task in tasks for pid in (task / "children").read_text().split()]
    assert children, "the server started no engine process"
    for pid in children:
        os.kill(int(pid), signal.SIGINT)
    r = httpx.post(server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": 5, "stream": False})
    assert r.status_code == 200 and r.json()["finish_reason"] == "length"
