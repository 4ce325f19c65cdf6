"""One error shape, HTTP or in a stream: {"error": {message, type, param, code}}, `code` a string or null; no
Python exception's text for the client, and a request id that the client and the log both have."""

import logging

import pytest
from fastapi.testclient import TestClient
from service_helpers import parse_sse

from app import serving
from app.main import create_app
from app.settings import Settings
from model.request import Finished

FIELDS = {"message", "type", "param", "code"}


def settings(checkpoints, **overrides):
    return Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], **overrides)


@pytest.fixture(scope="module")
def client(checkpoints):
    with TestClient(create_app(settings(checkpoints, api_key="k", max_body_bytes=1024, max_headers=40))) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


def assert_shape(error):
    assert set(error) == FIELDS and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)


@pytest.mark.parametrize(
    "request_, status, code",
    [
        (lambda c: c.post("/generate", json={"prompt": "Hi", "temperature": -1}), 422, None),
        (lambda c: c.post("/generate", json={"prompt": "Hi", "model": "nope"}), 404, "model_not_found"),
        (lambda c: c.get("/v1/models/nope"), 404, "model_not_found"),
        (lambda c: c.get("/nope"), 404, None),
        (lambda c: c.get("/generate"), 405, None),
        (lambda c: c.post("/generate", json={"prompt": "a" * 2000}), 413, None),
        (lambda c: c.get("/v1/models", headers={f"x-{i}": "1" for i in range(50)}), 431, None),
        (lambda c: c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"),
        (lambda c: c.post("/generate", content=b'{"prompt": "\xff"}'), 400, None),
    ],
    ids=["422", "404 model", "404 model by path", "404 route", "405", "413", "431", "401", "400"],
)
def test_every_http_error_has_the_one_shape_with_a_string_or_null_code_and_a_request_id(client, request_, status, code):
    r = request_(client)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert_shape(r.json()["error"])
    assert r.json()["error"]["code"] == code
    assert r.headers["x-request-id"]


def test_the_openapi_schema_says_code_is_a_string_or_null(client):
    code = client.get("/openapi.json").json()["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert {t["type"] for t in code["anyOf"]} == {"string", "null"}


def test_a_callers_plain_request_id_is_kept_and_any_other_is_replaced(client):
    assert client.get("/health", headers={"X-Request-ID": "lb-42.a"}).headers["x-request-id"] == "lb-42.a"
    forged = client.get("/health", headers={"X-Request-ID": "a\tb 200 OK"}).headers["x-request-id"]
    assert forged != "a\tb 200 OK" and len(forged) == 16
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize(
    "end, message, code",
    [
        (Finished("error", "engine stopped"), "generation failed: engine stopped", None),
        (Finished("error", "the engine process exited", "engine_failed"), None, "engine_failed"),
        (Finished("error", "the model's output held NaN or infinity at this token (try float32)"), None, None),
        (Finished("error", "RuntimeError: CUDA error: device-side assert triggered"), "the generation failed", None),
        (Finished("error", "KeyError: 'secret path /home/x'"), "the generation failed", None),
    ],
)
def test_an_engine_error_shows_only_words_written_for_users(end, message, code):
    failed = serving.engine_failure(end)
    assert failed.message == (message or f"generation failed: {end.error}")
    assert failed.code == code
    assert (failed.detail is None) == (message != "the generation failed")


def raising_on_third_push(monkeypatch):
    real, calls = serving.TextStream.push, []

    def push(self, token):
        calls.append(token)
        if len(calls) == 3:
            raise KeyError("a bug's own text")
        return real(self, token)

    monkeypatch.setattr(serving.TextStream, "push", push)


def test_an_unexpected_exception_mid_stream_ends_it_with_an_error_event_naming_the_logged_request_id(
    client, monkeypatch, caplog
):
    raising_on_third_push(monkeypatch)
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10}, headers={"X-Request-ID": "sse-1"})
    assert r.status_code == 200  # the stream had started
    events = parse_sse(r.text)
    assert [name for name, _ in events] == ["token"] * 2 + ["error"]
    error = events[-1][1]["error"]
    assert_shape(error)
    assert error == {
        "message": "internal server error; request id sse-1",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    (line,) = [rec for rec in caplog.records if "sse-1" in rec.getMessage()]
    assert line.levelname == "ERROR" and "a bug's own text" in line.exc_text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_an_unexpected_exception_mid_openai_stream_ends_it_with_an_error_object_then_done(client, monkeypatch, route):
    raising_on_third_push(monkeypatch)
    body = {"max_tokens": 10, "stream": True, "n": 2}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    r = client.post(route, json=body, headers={"X-Request-ID": "oai-1"})
    assert r.status_code == 200
    data = [d for _, d in parse_sse(r.text)]
    assert data[-1] == "[DONE]"
    error = data[-2]["error"]
    assert_shape(error)
    assert error["message"] == "internal server error; request id oai-1" and "bug" not in r.text


def test_a_failed_generation_in_plain_text_says_so_without_the_exception(client, monkeypatch):
    raising_on_third_push(monkeypatch)
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10}, headers={"Accept": "text/plain"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert r.text.endswith(f"\n[error: internal server error; request id {rid}]\n") and "bug" not in r.text


def test_an_engine_exception_in_a_stream_is_logged_at_error_with_the_request_id_the_client_gets(
    checkpoints, monkeypatch, caplog
):
    app = create_app(settings(checkpoints))
    with TestClient(app) as c:
        monkeypatch.setattr(app.state.service.models["tiny-gpt"].engine.cache, "decode", lambda ids: 1 / 0)
        with caplog.at_level(logging.ERROR, logger="quill"):
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "stream": True})
    rid = r.headers["x-request-id"]
    error = [d for _, d in parse_sse(r.text)][-2]["error"]
    assert error == {
        "message": f"the generation failed; request id {rid}",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    (line,) = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert line.levelname == "ERROR" and "ZeroDivisionError: division by zero" in line.getMessage()
