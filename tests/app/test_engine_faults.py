"""The app on its default engine, a child process: the same answers as the engine in a thread, and what a client
and an operator see when that child dies, hangs or keeps dying."""

import logging
import os
import re
import shutil
import signal

import pytest
from fastapi.testclient import TestClient
from service_helpers import metric, parse_sse, wait_until

from app.main import create_app
from app.registry import load_served_model
from app.settings import Settings

pytestmark = pytest.mark.slow  # each app starts a child process per model

LONG = {"prompt": "ROMEO:", "max_new_tokens": 2000, "seed": 9, "temperature": 0.9, "top_k": 20}


def settings(*paths, **overrides):
    return Settings(_env_file=None, checkpoints=[str(p) for p in paths], **overrides)


@pytest.fixture(scope="module")
def clients(checkpoints):
    """{"process": the default engine, "thread": the engine in the server's process}, serving the same models."""
    paths = [checkpoints[n] for n in ("tiny-gpt", "tiny-lstm")]
    with (
        TestClient(create_app(settings(*paths, engine_process=True))) as process,
        TestClient(create_app(settings(*paths, engine_process=False))) as thread,
    ):
        yield {"process": process, "thread": thread}


def child_pid(client, model="tiny-gpt"):
    return client.app.state.service.models[model].engine.child.proc.pid


def restarts(client, reason="died"):
    return metric(client.get("/metrics").text, "quill_engine_restarts_total", model="tiny-gpt", reason=reason) or 0


def stream_through(client, sig, body=LONG):
    """The events of a LONG stream (or `body`'s) during which the engine child gets `sig`, after its 50th token."""
    with client.stream("POST", "/generate", json=body) as r:
        lines, sent = [], False
        for line in r.iter_lines():
            lines.append(line)
            if not sent and sum(x.startswith("event: token") for x in lines) == 50:
                os.kill(child_pid(client), sig)
                sent = True
    assert sent
    return parse_sse("\n".join(lines) + "\n\n")


CASES = [
    ("/generate", {"prompt": "ROMEO:", "max_new_tokens": 60, "seed": 4, "temperature": 0.8, "stream": False}),
    (
        "/generate",
        {"prompt": "Hi", "max_new_tokens": 80, "temperature": 0, "seed": 1, "model": "tiny-lstm", "stream": False},
    ),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 30, "n": 3, "seed": 1, "top_p": 0.9}),
    ("/v1/completions", {"prompt": "To be, or not to be" * 20, "max_tokens": 0, "echo": True, "logprobs": 2}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 5, "n": 2, "echo": True, "logprobs": 1, "seed": 3}),
    ("/generate", {"prompt": "Well", "regex": r"(yes|no), [a-z]{2,9}\.", "seed": 2, "stream": False}),
]


@pytest.mark.parametrize("route, body", CASES, ids=["generate", "lstm", "n-choices", "scoring", "echo-n", "regex"])
def test_the_default_engine_process_answers_as_the_engine_in_a_thread(clients, route, body):
    answers = {}
    for engine, client in clients.items():
        r = client.post(route, json=body)
        assert r.status_code == 200, r.text
        answers[engine] = r.json()
    for a in answers.values():
        for volatile in ("id", "created", "timings", "checkpoint_sha256"):
            a.pop(volatile, None)
    if route == "/generate":
        assert answers["process"] == answers["thread"]
    else:
        got, want = answers["process"]["choices"], answers["thread"]["choices"]
        assert [c["text"] for c in got] == [c["text"] for c in want]
        for g, w in zip(got, want):
            if w.get("logprobs"):
                assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
                assert g["logprobs"]["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-4)


def test_a_stream_goes_on_through_a_killed_engine_and_ends_with_its_fault_free_text(clients, caplog):
    client = clients["process"]
    caplog.set_level(logging.INFO, "quill")
    expected = client.post("/generate", json={**LONG, "stream": False}).json()["text"]
    before = restarts(client)
    events = stream_through(client, signal.SIGKILL)
    assert events[-1][0] == "done", events[-1]
    assert events[-1][1]["text"] == expected and events[-1][1]["usage"]["completion_tokens"] == LONG["max_new_tokens"]
    assert restarts(client) == before + 1
    assert "1 request resumed" in caplog.text  # it was killed mid-stream, not after


def test_a_constrained_stream_resumes_through_a_killed_engine_and_still_matches(clients):
    client, body = clients["process"], {**LONG, "regex": "[a-z ]+"}  # a regex that never completes: 2,000 tokens
    expected = client.post("/generate", json={**body, "stream": False}).json()["text"]
    events = stream_through(client, signal.SIGKILL, body)
    assert events[-1][0] == "done", events[-1]
    assert events[-1][1]["text"] == expected and re.fullmatch("[a-z ]+", expected) and len(expected) == 2000


def test_while_the_engine_restarts_ready_and_new_requests_answer_503_with_retry_after(clients):
    client = clients["process"]
    os.kill(child_pid(client), signal.SIGKILL)
    assert wait_until(lambda: client.get("/ready").status_code == 503, timeout=10, interval=0.005)
    ready, refused = client.get("/ready"), client.post("/generate", json={"prompt": "Hi", "stream": False})
    assert client.get("/health").status_code == 200  # alive: a restart is under way
    for r in (ready, refused):
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "tiny-gpt" in r.json()["error"]["message"] and "restarting" in r.json()["error"]["message"]
    assert wait_until(lambda: client.get("/ready").status_code == 200, timeout=60)
    assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 5, "stream": False}).status_code == 200


def test_a_hung_engine_is_killed_and_replaced_after_the_timeout(checkpoints, caplog):
    caplog.set_level(logging.INFO, "quill")
    with TestClient(create_app(settings(checkpoints["tiny-gpt"], engine_process=True, engine_timeout=2))) as client:
        expected = client.post("/generate", json={**LONG, "stream": False}).json()["text"]
        assert stream_through(client, signal.SIGSTOP)[-1][1]["text"] == expected
        assert restarts(client, "hung") == 1 and "1 request resumed" in caplog.text


def test_a_crash_loop_turns_health_503_and_refuses_requests_naming_why(checkpoints, tmp_path):
    run = shutil.copytree(checkpoints["tiny-gpt"], tmp_path / "tiny-gpt")
    with TestClient(create_app(settings(run, engine_process=True))) as client:
        (run / "model.safetensors").write_bytes(b"not safetensors")  # every new child fails to start
        os.kill(child_pid(client), signal.SIGKILL)
        assert wait_until(lambda: client.get("/health").status_code == 503, timeout=120)
        health = client.get("/health").json()["error"]["message"]
        assert health.startswith("unhealthy: model tiny-gpt: the engine process failed 5 times")
        assert client.get("/ready").status_code == 503
        refused = client.post("/generate", json={"prompt": "Hi", "stream": False})
        assert refused.status_code == 503 and "failed 5 times" in refused.json()["error"]["message"]


def test_an_lstm_served_with_compile_plans_no_compiled_batch_sizes(checkpoints):
    """It is never compiled: /ready's progress must not list batch sizes for it."""
    served = load_served_model(
        checkpoints["tiny-lstm"] / "model.safetensors", "cpu", 4, None, compiled=True, process=True
    )
    assert served.engine.compiled_sizes() is None
    gpt = load_served_model(checkpoints["tiny-gpt"] / "model.safetensors", "cpu", 4, None, compiled=True, process=True)
    assert gpt.engine.compiled_sizes() == ([], [1, 2, 3, 4])
