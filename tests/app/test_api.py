"""The HTTP API in-process: what each route sends, and how it refuses what it must refuse."""

import asyncio
import contextlib
import hashlib
import json
import os

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import metric, parse_sse
from starlette.routing import Mount

from app import registry
from app.main import create_app
from app.metrics import Metrics
from app.routes_playground import PLAYGROUND_PATHS
from app.serving import Service
from app.settings import Settings

DONE_FIELDS = {"finish_reason", "text", "usage", "timings", "seed", "model", "checkpoint_sha256"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def settings(checkpoints, names=("tiny-gpt", "tiny-lstm", "byte-gpt"), **overrides):
    return Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in names], **overrides)


@pytest.fixture(scope="module")
def client(checkpoints):
    with TestClient(create_app(settings(checkpoints))) as c:
        yield c


@contextlib.contextmanager
def serving(app):
    with TestClient(app) as c:
        yield c


@contextlib.asynccontextmanager
async def async_serving(app):
    """An AsyncClient whose requests can run concurrently; the lifespan loads and warms the models."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://quill") as c,
    ):
        yield c


async def until(predicate, timeout=30):
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def stream(client, **body):
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    return [data for name, data in events if name == "token"], events[-1]


def complete(client, **body):
    r = client.post("/generate", json={**body, "stream": False})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status, param=None, code=None):
    """The one error shape; `code` is a string a client may act on, or None."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_FIELDS
    assert body["error"]["code"] == code
    assert r.headers["x-request-id"]
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
        assert param.split(".")[0] in body["error"]["message"]
    return body["error"]


# -- POST /generate --


def test_generate_streams_one_event_per_token_then_done(client, checkpoints):
    tokens, (name, done) = stream(client, prompt="Hello", max_new_tokens=12, seed=3)
    assert name == "done"
    assert [t["index"] for t in tokens] == list(range(12))
    assert all(isinstance(t["id"], int) and isinstance(t["text"], str) for t in tokens)
    assert set(done) == DONE_FIELDS
    assert done["finish_reason"] == "length"
    assert done["text"] == "".join(t["text"] for t in tokens)
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert set(done["timings"]) == {"queue_s", "time_to_first_token_s", "total_s", "tokens_per_s"}
    assert done["seed"] == 3
    assert done["model"] == "tiny-gpt"
    weights = checkpoints["tiny-gpt"] / "model.safetensors"
    assert done["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_generate_without_stream_returns_the_done_fields_as_one_object(client):
    body = complete(client, prompt="Hello", max_new_tokens=12, seed=3)
    _, (_, done) = stream(client, prompt="Hello", max_new_tokens=12, seed=3)
    assert set(body) == DONE_FIELDS
    assert {k: v for k, v in body.items() if k != "timings"} == {k: v for k, v in done.items() if k != "timings"}


def test_generate_with_accept_text_plain_streams_the_bare_text(client):
    r = client.post(
        "/generate", json={"prompt": "Hello", "max_new_tokens": 20, "seed": 4}, headers={"Accept": "text/plain"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == complete(client, prompt="Hello", max_new_tokens=20, seed=4)["text"] + "\n"


def test_generate_same_seed_same_text_and_another_seed_another_text(client):
    texts = [complete(client, prompt="Once", max_new_tokens=30, seed=s)["text"] for s in (9, 9, 10)]
    assert texts[0] == texts[1] != texts[2]


def test_generate_without_a_seed_returns_the_one_it_used_and_it_reproduces_the_text(client):
    first = complete(client, prompt="Once", max_new_tokens=30)
    again = complete(client, prompt="Once", max_new_tokens=30, seed=first["seed"])
    assert again["text"] == first["text"]


def test_generate_temperature_zero_ignores_the_seed(client):
    texts = {complete(client, prompt="Once", max_new_tokens=30, temperature=0, seed=s)["text"] for s in (1, 2)}
    assert len(texts) == 1


def test_generate_stop_string_ends_with_finish_reason_stop_and_is_never_sent(client):
    free = complete(client, prompt="Hello", max_new_tokens=40, temperature=0)["text"]
    stop = free[12:15]
    expected = free[: free.index(stop)]
    tokens, (_, done) = stream(client, prompt="Hello", max_new_tokens=40, temperature=0, stop=[stop])
    assert done["finish_reason"] == "stop"
    assert done["text"] == expected
    assert "".join(t["text"] for t in tokens) == expected
    assert done["usage"]["completion_tokens"] == len(tokens)


def test_generate_stop_string_that_never_appears_sends_everything(client):
    free = complete(client, prompt="Hello", max_new_tokens=40, temperature=0)["text"]
    body = complete(client, prompt="Hello", max_new_tokens=40, temperature=0, stop=["never there"])
    assert (body["finish_reason"], body["text"]) == ("length", free)


def test_generate_top_k_1_gives_the_greedy_text(client):
    greedy = complete(client, prompt="Hello", max_new_tokens=30, temperature=0)["text"]
    assert complete(client, prompt="Hello", max_new_tokens=30, temperature=1.5, top_k=1, seed=8)["text"] == greedy


def test_generate_vanishing_temperature_gives_the_greedy_text(client):
    greedy = complete(client, prompt="Hello", max_new_tokens=30, temperature=0)["text"]
    assert complete(client, prompt="Hello", max_new_tokens=30, temperature=1e-300)["text"] == greedy


def test_generate_chooses_the_model_by_name_and_defaults_to_the_first(client):
    assert complete(client, prompt="Hi", max_new_tokens=3)["model"] == "tiny-gpt"
    assert complete(client, prompt="Hi", max_new_tokens=3, model="tiny-lstm")["model"] == "tiny-lstm"


def test_generate_with_a_byte_model_never_splits_a_character(client):
    # random weights emit random bytes: some form whole multi-byte characters, most are invalid
    for seed in range(20):
        tokens, (_, done) = stream(
            client, prompt="héllo", max_new_tokens=300, temperature=1.0, seed=seed, model="byte-gpt"
        )
        sent = "".join(t["text"] for t in tokens)
        assert sent == done["text"] == bytes(t["id"] for t in tokens).decode("utf-8", errors="replace")
        if any(ord(c) > 127 and c != "\ufffd" for c in sent):
            return
    pytest.fail("no seed produced a multi-byte character, so this test proved nothing")


def test_generate_prompt_longer_than_the_context_is_served(client):
    body = complete(client, prompt="abc " * 100, max_new_tokens=5)
    assert body["usage"]["prompt_tokens"] == 400
    assert body["usage"]["completion_tokens"] == 5


def test_generate_same_seed_same_text_when_requests_share_a_batch(checkpoints):
    async def run():
        async with async_serving(create_app(settings(checkpoints, ["tiny-gpt"]))) as c:
            body = {"prompt": "Hello", "max_new_tokens": 60, "stream": False}
            alone = (await c.post("/generate", json={**body, "seed": 5})).json()["text"]
            seeds = [5, 6, 5, 7, 5]
            rs = await asyncio.gather(*[c.post("/generate", json={**body, "seed": s}) for s in seeds])
            metrics = (await c.get("/metrics")).text
            return alone, [r.json()["text"] for r, s in zip(rs, seeds) if s == 5], metrics

    alone, batched, metrics = asyncio.run(run())
    assert metric(metrics, "quill_batch_size_bucket", le="1.0") < metric(metrics, "quill_batch_size_count"), (
        "no step ever ran more than one request, so this test proved nothing"
    )
    assert batched == [alone] * 3


def test_engine_failure_mid_stream_ends_with_an_error_event_and_the_server_keeps_serving(checkpoints, monkeypatch):
    app = create_app(settings(checkpoints, ["tiny-gpt"]))
    with serving(app) as c:
        cache = app.state.service.models["tiny-gpt"].engine.cache
        real_decode, calls = cache.decode, []

        def decode_failing_once(ids):
            calls.append(ids)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real_decode(ids)

        monkeypatch.setattr(cache, "decode", decode_failing_once)
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10})
        assert r.status_code == 200  # the stream had started
        events = parse_sse(r.text)
        assert [name for name, _ in events] == ["token"] * 3 + ["error"]
        error = events[-1][1]["error"]
        assert set(error) == ERROR_FIELDS and error["code"] is None and error["type"] == "server_error"
        assert "injected failure" not in error["message"]  # an exception's text is for the log only
        assert error["message"] == f"the generation failed; request id {r.headers['x-request-id']}"
        assert metric(c.get("/metrics").text, "quill_requests_total", route="/generate", status="500") == 1
        assert complete(c, prompt="Hi", max_new_tokens=10)["usage"]["completion_tokens"] == 10


def test_engine_failure_without_stream_gives_500_whose_message_names_the_request_id_the_log_has(
    checkpoints, monkeypatch, caplog
):
    app = create_app(settings(checkpoints, ["tiny-gpt"]))
    with serving(app) as c:
        monkeypatch.setattr(app.state.service.models["tiny-gpt"].engine.cache, "decode", lambda ids: 1 / 0)
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10, "stream": False})
        error = assert_error(r, 500)
        assert "ZeroDivisionError" not in error["message"]
        rid = r.headers["x-request-id"]
        assert error["message"] == f"the generation failed; request id {rid}"
        (line,) = [rec for rec in caplog.records if rid in rec.getMessage()]
        assert line.levelname == "ERROR" and "ZeroDivisionError: division by zero" in line.getMessage()


# -- bad input: 422, one error shape, naming the field --

BAD_GENERATE = [
    ('{"prompt": "Hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "Hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "Hi", "top_p": -Infinity}', "top_p"),
    ('{"prompt": "Hi", "temperature": 1e999}', "temperature"),
    ('{"prompt": "Hi", "temperature": -0.5}', "temperature"),
    ('{"prompt": "Hi", "temperature": 1e300}', "temperature"),
    ('{"prompt": "Hi", "max_new_tokens": -1}', "max_new_tokens"),
    ('{"prompt": "Hi", "max_new_tokens": 0}', "max_new_tokens"),
    ('{"prompt": "Hi", "max_new_tokens": 100000000000000000000000}', "max_new_tokens"),
    ('{"prompt": "Hi", "max_new_tokens": 1.5}', "max_new_tokens"),
    ('{"prompt": "Hi", "max_new_tokens": "5"}', "max_new_tokens"),
    ('{"prompt": "Hi", "max_new_tokens": true}', "max_new_tokens"),
    ('{"prompt": "Hi", "temperature": "0.5"}', "temperature"),
    ('{"prompt": "Hi", "temperature": false}', "temperature"),
    ('{"prompt": "Hi", "top_k": 0}', "top_k"),
    ('{"prompt": "Hi", "top_k": true}', "top_k"),
    ('{"prompt": "Hi", "top_p": 0}', "top_p"),
    ('{"prompt": "Hi", "top_p": 1.5}', "top_p"),
    ('{"prompt": "Hi", "seed": -1}', "seed"),
    ('{"prompt": "Hi", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "Hi", "seed": "42"}', "seed"),
    ('{"prompt": "Hi", "stream": "yes"}', "stream"),
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": " \\n\\t "}', "prompt"),
    ('{"prompt": 5}', "prompt"),
    ('{"prompt": null}', "prompt"),
    ('{"max_new_tokens": 5}', "prompt"),
    (json.dumps({"prompt": "a" * 16_001}), "prompt"),
    ('{"prompt": "h\\u00e9llo"}', "prompt"),  # the character model has no "é"
    ('{"prompt": "Hi \\ud83c"}', "prompt"),  # a lone surrogate
    ('{"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ('{"prompt": "Hi", "stop": [""]}', "stop.0"),
    ('{"prompt": "Hi", "stop": "a"}', "stop"),
    ('{"prompt": "Hi", "max_tokens": 5}', "max_tokens"),
    ('{"prompt": "Hi", "model": 3}', "model"),
    ('{"prompt": "Hi", "min_p": 1.5}', "min_p"),
    ('{"prompt": "Hi", "min_p": -0.1}', "min_p"),
    ('{"prompt": "Hi", "repetition_penalty": 0}', "repetition_penalty"),
    ('{"prompt": "Hi", "repetition_penalty": 5e-324}', "repetition_penalty"),
    ('{"prompt": "Hi", "repetition_penalty": 10.5}', "repetition_penalty"),
    ('{"prompt": "Hi", "logprobs": -1}', "logprobs"),
    ('{"prompt": "Hi", "logprobs": 2.5}', "logprobs"),
]

BAD_COMPLETIONS = [
    ('{"prompt": "Hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "Hi", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "Hi", "max_tokens": "16"}', "max_tokens"),
    ('{"prompt": "Hi", "n": 9}', "n"),
    ('{"prompt": "Hi", "n": 0}', "n"),
    ('{"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ('{"prompt": "Hi", "stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
    ('{"prompt": "Hi", "logprobs": 21}', "logprobs"),
    ('{"prompt": "Hi", "logprobs": true}', "logprobs"),
    ('{"prompt": "Hi", "echo": 1}', "echo"),
    ('{"prompt": "Hi", "presence_penalty": 2.5}', "presence_penalty"),
    ('{"prompt": "Hi", "frequency_penalty": -3}', "frequency_penalty"),
    ('{"prompt": "Hi", "best_of": 2}', "best_of"),
    ('{"prompt": "   "}', "prompt"),
    ('{"prompt": "Hi", "min_p": 2}', "min_p"),
    ('{"prompt": "Hi", "repetition_penalty": -1}', "repetition_penalty"),
]

BAD_BODIES = [("/generate", body, param) for body, param in BAD_GENERATE] + [
    ("/v1/completions", body, param) for body, param in BAD_COMPLETIONS
]


@pytest.mark.parametrize("route, body, param", BAD_BODIES, ids=[f"{r} {b[:60]}" for r, b, _ in BAD_BODIES])
def test_bad_parameter_gives_422_in_the_error_shape_naming_the_field(client, route, body, param):
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 422, param)


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/generate", {"prompt": "héllo", "model": "tiny-lstm"}, "prompt"),
        ("/v1/completions", {"prompt": "héllo", "model": "tiny-gpt"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "é"}], "model": "tiny-gpt"}, "messages"),
    ],
)
def test_a_prompt_the_models_vocabulary_lacks_gets_422_naming_the_model_and_the_characters(client, route, body, param):
    error = assert_error(client.post(route, json=body), 422, param)
    assert f"model {body['model']!r}" in error["message"] and "'é'" in error["message"]


@pytest.mark.parametrize(
    "body, where",
    [(b'{"prompt": "\xff\xfe"}', "byte 12"), (b"\xff", "byte 0"), (b'{"prompt": "caf\xc3"}', "byte 15")],
    ids=["invalid bytes", "one byte", "cut character"],
)
def test_a_body_that_is_not_utf8_gets_400_saying_so_and_where(client, body, where):
    error = assert_error(client.post("/generate", content=body, headers={"Content-Type": "application/json"}), 400)
    assert "not UTF-8" in error["message"] and where in error["message"], error["message"]


@pytest.mark.parametrize("route, length", [("/generate", "max_new_tokens"), ("/v1/completions", "max_tokens")])
def test_every_sampling_field_of_the_body_reaches_the_sampler_whole(client, monkeypatch, route, length):
    from model import sampling

    seen = []

    def recording(samplers, logits):
        for sampler, row in zip(samplers, logits):
            sampler.adjust(row)  # makes its seen mask and counts
            mask = None if sampler.seen is None else sampler.seen.nonzero().flatten().tolist()
            seen.append((sampler.params, mask, None if sampler.counts is None else sampler.counts.clone()))
            sampler.took(0)
        return [0] * len(samplers)

    monkeypatch.setattr(sampling, "sample", recording)
    body = {
        "prompt": "Hi",
        length: 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "min_p": 0.2,
        "repetition_penalty": 1.5,
        "seed": 11,
        "stop": ["zz"],
        "stream": False,
    }
    if route == "/v1/completions":  # OpenAI's penalties
        body |= {"presence_penalty": 0.5, "frequency_penalty": -0.25}
    assert client.post(route, json=body).status_code == 200
    params = {p for p, _, _ in seen}
    assert len(seen) == 3 and len(params) == 1
    p = params.pop()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.seed, p.stop) == (
        3,
        0.7,
        0.9,
        0.2,
        1.5,
        11,
        ("zz",),
    )
    prompt_ids = sorted(set(client.app.state.service.get(None).tokenizer.encode("Hi")))
    assert seen[0][1] == prompt_ids  # the prompt counts as seen by the repetition penalty
    if route == "/v1/completions":
        assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.25)
        # the counts are of generated tokens only (the recording sampler always picks id 0)
        assert [c.nonzero().flatten().tolist() for _, _, c in seen] == [[], [0], [0]]
        assert float(seen[2][2][0]) == 2


# -- bodies: JSON whatever the Content-Type, but not from a page on another site --

FORM = "application/x-www-form-urlencoded"  # what `curl -d` declares
NOT_JSON_TYPES = [FORM, "text/plain", None]


def post_as(client, route, body, content_type, origin=None):
    headers = {"Content-Type": content_type} if content_type else {}
    if origin:
        headers["Origin"] = origin
    return client.post(route, content=body, headers=headers)


THREE_TOKENS = {
    "/generate": '{"prompt": "Hi", "max_new_tokens": 3, "stream": false}',
    "/v1/completions": '{"prompt": "Hi", "max_tokens": 3}',
}


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
@pytest.mark.parametrize("route, field", [("/generate", "text"), ("/v1/completions", "choices")])
def test_json_object_body_is_read_whatever_its_declared_content_type(client, route, field, content_type):
    r = post_as(client, route, THREE_TOKENS[route], content_type)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and field in r.json()


@pytest.mark.parametrize("content_type", ["application/json", FORM])
@pytest.mark.parametrize(
    "body, kind",
    [
        ("not json", "not valid JSON"),
        ("prompt=Hi", "not valid JSON"),
        ("[]", "an array"),
        ('[{"prompt": "Hi"}]', "an array"),
        ('"prompt"', "a string"),
        ("", "empty"),
        ('{"prompt": "Hi",}', "not valid"),
    ],
)
def test_body_that_is_not_a_json_object_gives_422_saying_what_to_send(client, body, kind, content_type):
    error = assert_error(post_as(client, "/generate", body, content_type), 422)
    assert error["message"].startswith("the body must be a JSON object (")
    assert kind in error["message"] and error["message"].endswith("send Content-Type: application/json")
    assert error["param"] is None


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://testserver.evil.example"])
@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_non_json_body_from_a_cross_site_origin_is_refused_with_403_and_generates_nothing(
    client, route, origin, content_type
):
    tokens = metric(client.get("/metrics").text, "quill_tokens_generated_total", model="tiny-gpt") or 0
    error = assert_error(post_as(client, route, THREE_TOKENS[route], content_type, origin), 403)
    assert "cross-site" in error["message"] and "Content-Type: application/json" in error["message"]
    assert origin in error["message"]
    assert metric(client.get("/metrics").text, "quill_tokens_generated_total", model="tiny-gpt") == tokens


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
@pytest.mark.parametrize("origin", ["http://testserver", "https://ok.example"], ids=["same origin", "cors origin"])
def test_non_json_body_from_the_servers_own_origin_or_an_allowed_cors_origin_is_read(checkpoints, origin, content_type):
    with serving(create_app(settings(checkpoints, ["tiny-gpt"], cors_origins=["https://ok.example"]))) as c:
        r = post_as(c, "/generate", THREE_TOKENS["/generate"], content_type, origin)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3


def test_json_body_from_a_cross_site_origin_is_left_to_cors(client):
    # a browser preflights application/json, and CORS (closed here) answers the preflight; the POST itself
    # is served as before, with no header that lets the other site read the reply
    r = post_as(client, "/generate", THREE_TOKENS["/generate"], "application/json", "https://evil.example")
    assert r.status_code == 200, r.text
    assert "access-control-allow-origin" not in r.headers


def test_server_keeps_serving_after_every_bad_request(client):
    for route, body, _ in BAD_BODIES:
        assert client.post(route, content=body, headers={"Content-Type": "application/json"}).status_code == 422
        assert complete(client, prompt="Hi", max_new_tokens=2)["finish_reason"] == "length"


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_unknown_model_gives_404_in_the_error_shape(client, route):
    error = assert_error(client.post(route, json={"prompt": "Hi", "model": "nope"}), 404, "model", "model_not_found")
    assert "tiny-gpt" in error["message"]  # says what is served


def test_oversized_body_gives_413(client):
    assert_error(client.post("/generate", json={"prompt": "a" * 300_000}), 413)


def test_oversized_body_without_a_length_gives_413(client):
    def chunks():  # chunked transfer: no Content-Length to refuse it by
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a" * 4096
        yield b'"}'

    assert_error(client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert complete(client, prompt="Hi", max_new_tokens=2)["finish_reason"] == "length"


def test_unknown_route_gives_404_in_the_error_shape(client):
    assert_error(client.get("/nope"), 404)


def test_wrong_method_gives_405_in_the_error_shape(client):
    assert_error(client.get("/generate"), 405)


# -- operations --


def test_health_says_ok(client):
    r = client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_ready_lists_the_models_once_loaded(client):
    r = client.get("/ready")
    assert r.status_code == 200
    # these apps decode eagerly (tests/conftest.py: QUILL_COMPILE=0): no compile to report
    assert r.json() == {"status": "ready", "models": ["tiny-gpt", "tiny-lstm", "byte-gpt"], "compiled": {}}


def test_ready_is_503_before_the_models_are_loaded(checkpoints):
    app = create_app(settings(checkpoints))
    r = TestClient(app).get("/ready")  # outside `with`: the lifespan has not run
    assert r.status_code == 503 and "Retry-After" in r.headers
    body = r.json()
    assert set(body["error"]) == ERROR_FIELDS and body["error"]["message"] == "not ready: starting"
    assert body["error"]["code"] == "server_starting"
    assert body["models"] == {}  # none loaded yet (python -m app loads them first, then reports each one's start)


def test_no_checkpoint_configured_or_bundled_fails_saying_how_to_train_one(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "BUNDLED", tmp_path)
    with pytest.raises(ValueError, match="python -m train"):
        Service(Settings(_env_file=None), Metrics()).load()


def bundled_with_a_users_runs(root, checkpoints):
    """A checkpoints/ folder as a user leaves it: the bundled runs, and two of their own trained into it."""
    runs = {
        "shakespeare-gpt": "tiny-gpt",
        "shakespeare-lstm": "tiny-lstm",
        "pystd-gpt": "byte-gpt",
        "a-gpt": "tiny-gpt",
    }
    for run, fixture in runs.items():
        (root / run).symlink_to(checkpoints[fixture])
    return root


def test_a_run_trained_into_checkpoints_is_served_but_the_bundled_gpt_stays_the_default(
    checkpoints, monkeypatch, tmp_path
):
    monkeypatch.setattr(registry, "BUNDLED", bundled_with_a_users_runs(tmp_path, checkpoints))
    service = Service(Settings(_env_file=None), Metrics())
    service.load()
    assert list(service.models) == ["shakespeare-gpt", "a-gpt", "pystd-gpt", "shakespeare-lstm"]
    assert service.get(None).name == "shakespeare-gpt"


def test_the_default_model_setting_names_the_model_a_request_without_one_gets_listed_first(
    checkpoints, monkeypatch, tmp_path
):
    monkeypatch.setattr(registry, "BUNDLED", bundled_with_a_users_runs(tmp_path, checkpoints))
    service = Service(Settings(_env_file=None, default_model="pystd-gpt"), Metrics())
    service.load()
    assert list(service.models)[0] == service.get(None).name == "pystd-gpt"


def test_the_first_configured_checkpoint_is_the_default_model_and_the_log_says_so(checkpoints, caplog):
    with (
        caplog.at_level("INFO", logger="quill"),
        TestClient(create_app(settings(checkpoints, ("tiny-lstm", "tiny-gpt")))) as c,
    ):
        assert complete(c, prompt="Hi", max_new_tokens=2)["model"] == "tiny-lstm"
    assert "default model: tiny-lstm (the first checkpoint named; requests that name none get it)" in caplog.text


def test_a_default_model_that_is_not_served_is_refused_naming_the_served_ones(checkpoints):
    with pytest.raises(ValueError, match=r"QUILL_DEFAULT_MODEL.*'nope'.*\['tiny-gpt', 'tiny-lstm'\]"):
        Service(settings(checkpoints, ("tiny-gpt", "tiny-lstm"), default_model="nope"), Metrics()).load()


def test_two_checkpoints_of_one_name_are_refused_naming_both(checkpoints, tmp_path):
    (tmp_path / "tiny-gpt").symlink_to(checkpoints["tiny-lstm"])
    twins = [str(checkpoints["tiny-gpt"]), str(tmp_path / "tiny-gpt")]
    with pytest.raises(ValueError, match="two checkpoints are both named 'tiny-gpt'"):
        Service(Settings(_env_file=None, checkpoints=twins), Metrics()).load()


def test_metrics_count_requests_by_route_and_status_and_every_token(client):
    before = client.get("/metrics").text
    tokens_before = metric(before, "quill_tokens_generated_total", model="tiny-lstm") or 0
    ok_before = metric(before, "quill_requests_total", route="/generate", status="200") or 0
    bad_before = metric(before, "quill_requests_total", route="/generate", status="422") or 0
    complete(client, prompt="Hi", max_new_tokens=7, model="tiny-lstm")
    client.post("/generate", json={"prompt": ""})

    after = client.get("/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "quill_tokens_generated_total", model="tiny-lstm") == tokens_before + 7
    assert metric(text, "quill_requests_total", route="/generate", status="200") == ok_before + 1
    assert metric(text, "quill_requests_total", route="/generate", status="422") == bad_before + 1
    for name in ("quill_requests_running", "quill_requests_queued"):
        assert metric(text, name) == 0
    for name in ("quill_batch_size", "quill_time_to_first_token_seconds", "quill_inter_token_latency_seconds"):
        assert metric(text, name + "_count") > 0
        assert metric(text, name + "_bucket", le="+Inf") == metric(text, name + "_count")


# -- OpenAI-compatible --


def test_v1_models_lists_every_served_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-gpt", "tiny-lstm", "byte-gpt"]
    assert all(m["object"] == "model" for m in body["data"])


def test_v1_completions_returns_a_text_completion(client):
    r = client.post("/v1/completions", json={"model": "tiny-lstm", "prompt": "Hello", "max_tokens": 9, "seed": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-lstm"
    assert body["choices"][0]["finish_reason"] == "length"
    assert (
        body["choices"][0]["text"]
        == complete(client, prompt="Hello", max_new_tokens=9, seed=2, model="tiny-lstm", temperature=1.0)["text"]
    )
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def test_v1_completions_stream_ends_with_done_and_can_include_usage(client):
    body = {"prompt": "Hello", "max_tokens": 9, "seed": 2, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    data = [d for _, d in parse_sse(r.text)]
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]


def test_v1_completions_stream_without_include_usage_sends_no_usage(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "stream": True})
    data = [d for _, d in parse_sse(r.text)]
    assert data[-1] == "[DONE]"
    assert all("usage" not in d and d["choices"] for d in data[:-1])


def test_v1_completions_stop_accepts_one_string_and_is_never_sent(client):
    free = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 40, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    stop = text[10:12]
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 40, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert (choice["finish_reason"], choice["text"]) == ("stop", text[: text.index(stop)])


# -- API key and CORS --


def route_requests(app):
    """One well-formed request per route of the app, so that a new route cannot escape these tests."""
    bodies = {
        "/generate": {"prompt": "Hi", "max_new_tokens": 2},
        "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        "/tokenize": {"content": "Hi"},
        "/detokenize": {"tokens": [1, 2]},
    }
    routes = {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}
    for route in app.routes:  # the documentation page and its files, which the schema leaves out
        if isinstance(route, Mount):  # a folder of static files: one of them
            routes.setdefault(f"{route.path}/{min(os.listdir(route.app.directory))}", {"GET"})
        elif hasattr(route, "path"):
            routes.setdefault(route.path, route.methods - {"HEAD"})
    for path, methods in sorted(routes.items()):
        for method in sorted(methods):
            if method == "POST":
                assert path in bodies, f"add a body for the new route {path}"
            yield method, path.replace("{name}", "tiny-gpt"), bodies.get(path)  # a path parameter: a served model


def test_api_key_when_set_is_required_on_every_route_but_health_ready_and_the_playground_page(checkpoints):
    app = create_app(settings(checkpoints, ["tiny-gpt"], api_key="s3cret"))
    requests = list(route_requests(app))
    assert {("POST", "/generate"), ("GET", "/metrics"), ("GET", "/docs")} <= {(m, p) for m, p, _ in requests}
    with serving(app) as c:
        for method, path, body in requests:
            open_path = path in ("/health", "/ready") or path in PLAYGROUND_PATHS
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, json=body, headers=headers)
                if open_path:
                    assert r.status_code == 200, (method, path)
                else:
                    assert_error(r, 401, code="invalid_api_key")
                    assert r.headers["www-authenticate"] == "Bearer"
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, (method, path, r.text)


def test_cors_is_closed_by_default(client):
    preflight = client.options(
        "/generate", headers={"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    r = client.get("/health", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_is_open_to_the_configured_origins_only(checkpoints):
    app = create_app(settings(checkpoints, ["tiny-gpt"], cors_origins=["https://ok.example"]))
    with serving(app) as c:
        preflight = c.options(
            "/generate",
            headers={
                "Origin": "https://ok.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.post(
            "/generate",
            json={"prompt": "Hi", "max_new_tokens": 2, "stream": False},
            headers={"Origin": "https://ok.example"},
        )
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        other = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_preflight_needs_no_api_key(checkpoints):
    app = create_app(settings(checkpoints, ["tiny-gpt"], api_key="s3cret", cors_origins=["https://ok.example"]))
    with serving(app) as c:
        preflight = c.options(
            "/generate",
            headers={
                "Origin": "https://ok.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200


# -- admission --


def test_request_beyond_running_and_queued_limits_gets_429_with_retry_after_at_once(checkpoints):
    app = create_app(settings(checkpoints, ["tiny-gpt"], max_running=1, max_queued=0))
    models = app.state.service.models  # filled by the lifespan

    async def run():
        async with async_serving(app) as c:
            held = asyncio.create_task(c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2048}))
            await until(lambda: models["tiny-gpt"].engine.counts() == (1, 0))
            refused = await asyncio.wait_for(c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}), 5)
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held
            await until(lambda: models["tiny-gpt"].engine.counts() == (0, 0))
            after = await c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "stream": False})
            return refused, after

    refused, after = asyncio.run(run())
    error = assert_error(refused, 429, code="rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert after.status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_burst_of_requests_admits_exactly_running_plus_queued(checkpoints, stream):
    app = create_app(settings(checkpoints, ["tiny-gpt"], max_running=2, max_queued=1))

    async def run():
        async with async_serving(app) as c:
            body = {"prompt": "Hi", "max_new_tokens": 300, "stream": stream}
            return await asyncio.gather(*[c.post("/generate", json=body) for _ in range(7)])

    statuses = sorted(r.status_code for r in asyncio.run(run()))
    assert statuses == [200] * 3 + [429] * 4


def test_draining_service_refuses_new_requests_with_503(checkpoints):
    app = create_app(settings(checkpoints, ["tiny-gpt"]))

    async def run():
        async with async_serving(app) as c:
            await app.state.service.drain(0)
            return await c.post("/generate", json={"prompt": "Hi"}), await c.get("/ready")

    refused, ready = asyncio.run(run())
    assert_error(refused, 503, code="server_shutdown")
    assert assert_error(ready, 503, code="server_shutdown")["message"] == "not ready: draining"
