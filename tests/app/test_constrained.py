"""Constrained output: response_format (OpenAI's json_object and json_schema) on the completions and chat routes,
regex and grammar on /generate. Every output that says it finished ("stop") parses and validates with jsonschema
(or matches its regex); one cut by max_tokens says "length"; a format the model cannot write is refused."""

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from service_helpers import parse_sse

from app import constraints
from app.main import create_app
from app.settings import Settings

# Bounded: every value has a longest form, so a match is always within reach of max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["glad", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
# the longest match: six characters of six bytes each (\u escapes), the rest at their longest
ENOUGH = 160


@pytest.fixture(scope="module")
def client(checkpoints):
    names = ("byte-gpt", "bpe-gpt", "tiny-gpt", "tiny-lstm")
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in names]))) as c:
        yield c


def chat(client, model, response_format, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Who are you?"}],
        "response_format": response_format,
    }
    r = client.post("/v1/chat/completions", json=body | extra)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", ["byte-gpt", "bpe-gpt"])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.5])
def test_chat_json_schema_outputs_validate(client, model, temperature):
    body = chat(client, model, FORMAT, n=4, seed=3, temperature=temperature, max_tokens=ENOUGH)
    assert len(body["choices"]) == 4
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_completions_json_object_is_an_object_or_says_length(client):
    r = client.post(
        "/v1/completions",
        json={"model": "bpe-gpt", "prompt": "the quick", "max_tokens": 24, "n": 8, "seed": 1,
              "response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert all(c["text"].startswith("{") for c in choices)
    for c in choices:
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(c["text"]), dict)
        else:  # cut short: the text is not claimed whole
            assert c["finish_reason"] == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(c["text"])


def test_a_schema_cut_by_max_tokens_ends_with_length(client):
    body = chat(client, "byte-gpt", FORMAT, max_tokens=5, seed=2)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert choice["message"]["content"] == '{"nam'  # a byte a token, each one the schema's only choice


def test_streamed_chat_json_schema_deltas_make_valid_json(client):
    body = {"model": "bpe-gpt", "messages": [{"role": "user", "content": "hi"}], "response_format": FORMAT}
    r = client.post("/v1/chat/completions", json=body | {"stream": True, "seed": 5, "max_tokens": ENOUGH})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("model", ["tiny-gpt", "tiny-lstm"])
def test_generate_regex_on_a_character_model(client, model):
    pattern = r"(yes|no), [a-z]{2,5}\."
    for seed in range(4):
        body = {"model": model, "prompt": "Well", "regex": pattern, "seed": seed, "max_new_tokens": 40}
        events = parse_sse(client.post("/generate", json=body).text)
        done = events[-1][1]
        assert done["finish_reason"] == "stop", events[-1]
        assert re.fullmatch(pattern, done["text"])
        assert "".join(data["text"] for name, data in events if name == "token") == done["text"]


def test_generate_lark_grammar(client):
    grammar = 'start: greeting " " name "!"\ngreeting: "hi" | "hello"\nname: /[A-Z][a-z]{1,4}/'
    body = {"model": "tiny-gpt", "prompt": "Say", "grammar": grammar, "stream": False, "seed": 7}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    assert re.fullmatch(r"(hi|hello) [A-Z][a-z]{1,4}!", r.json()["text"])


def test_the_same_seed_gives_the_same_constrained_text(client):
    first, second = (chat(client, "byte-gpt", FORMAT, seed=11, max_tokens=ENOUGH) for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("path", "extra", "param", "words"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
            "response_format",
            "JSON schema",
        ),
        ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format", "json_object"),
        ("/generate", {"regex": "(unclosed"}, "regex", ""),
        ("/generate", {"grammar": "start: missing_rule"}, "grammar", "missing_rule"),
    ],
)
def test_a_format_that_does_not_compile_is_a_422_naming_its_field(client, path, extra, param, words):
    body = {"model": "byte-gpt", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    body = {k: v for k, v in body.items() if (k == "messages") == (path == "/v1/chat/completions") or k == "model"}
    r = client.post(path, json=body | extra)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and words in error["message"]


def test_two_formats_at_once_are_refused(client):
    r = client.post("/generate", json={"model": "byte-gpt", "prompt": "x", "regex": "a+", "grammar": 'start: "a"'})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "grammar"
    assert "give one output format: regex or grammar" in r.json()["error"]["message"]


def test_json_on_a_model_whose_vocabulary_cannot_write_it_is_a_400_and_the_server_goes_on(client):
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}], "response_format": FORMAT},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["code"] == "unsupported_format"
    assert "vocabulary" in error["message"] and "tiny-gpt" in error["message"]
    assert client.post("/generate", json={"model": "tiny-gpt", "prompt": "hi", "stream": False}).status_code == 200


def test_a_format_the_vocabulary_cannot_finish_ends_with_an_error_that_says_so(client):
    # the character model writes "yes" but has no "#": the text cannot go on to a match
    body = {"model": "tiny-gpt", "prompt": "Well", "regex": "yes#", "stream": False}
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsupported_format"
    assert "cannot be continued" in r.json()["error"]["message"]
    events = parse_sse(client.post("/generate", json=body | {"stream": True}).text)
    assert [name for name, _ in events] == ["token"] * 3 + ["error"]


def test_openai_client_parses_a_json_schema_response(client):
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client, max_retries=0)
    completion = oa.chat.completions.create(
        model="byte-gpt",
        messages=[{"role": "user", "content": "Describe someone."}],
        response_format=FORMAT,
        max_tokens=ENOUGH,
        seed=4,
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), SCHEMA)


def test_a_whole_match_whose_every_continuation_the_vocabulary_lacks_ends_with_stop(client):
    # "yes" matches; "yes#" would too, but the character model has no "#": the text is whole, not a dead end
    r = client.post("/generate", json={"model": "tiny-gpt", "prompt": "Well", "regex": "yes(#)?", "stream": False})
    assert r.status_code == 200, r.text
    assert (r.json()["text"], r.json()["finish_reason"]) == ("yes", "stop")


def test_response_format_text_is_no_format_beside_a_regex(client):
    body = {"model": "byte-gpt", "prompt": "x", "regex": "[0-9]{4}", "response_format": {"type": "text"}}
    r = client.post("/generate", json=body | {"stream": False, "seed": 1})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[0-9]{4}", r.json()["text"]) and r.json()["finish_reason"] == "stop"


def test_the_thread_engine_and_the_app_share_one_vocabulary(client):
    served = client.app.state.service.get("bpe-gpt")
    body = {"model": "bpe-gpt", "prompt": "x", "regex": "[a-z]{3}", "stream": False, "seed": 1}
    assert client.post("/generate", json=body).status_code == 200
    assert served.engine.vocabulary is constraints.vocabulary(served.tokenizer)


def test_the_format_check_runs_off_the_event_loop(client, monkeypatch):
    loops, real = [], constraints.refuse_unsupported

    def spy(served, body):
        try:
            loops.append(asyncio.get_running_loop())
        except RuntimeError:  # no loop runs in this thread
            loops.append(None)
        return real(served, body)

    monkeypatch.setattr(constraints, "refuse_unsupported", spy)
    body = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}], "response_format": FORMAT}
    assert client.post("/v1/chat/completions", json=body).status_code == 400  # still refused, from the thread
    assert client.post("/generate", json={"model": "byte-gpt", "prompt": "x", "stream": False}).status_code == 200
    assert loops == [None]  # once, for the body with a format, in a thread without the loop
