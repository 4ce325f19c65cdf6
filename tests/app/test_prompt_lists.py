"""/v1/completions with OpenAI's other prompt shapes: a list of prompts (one choice per prompt and n, in order),
token ids, and lists of token ids; and the engine scoring a list's prompts together, in one forward a window."""

import openai
import pytest
from fastapi.testclient import TestClient
from helpers import tiny_gpt, tiny_lstm
from service_helpers import CONTEXT, parse_sse

from app.main import create_app
from app.settings import Settings
from model import load_checkpoint
from model.engine import Engine, Finished, Request
from model.sampling import SamplingParams
from model.scoring import LSTM_CHUNK, PromptLogprobs, score_prompt

PROMPTS = ["To be, or not", "the quick brown fox jumps over the lazy dog, again and again", "Hi"]


@pytest.fixture(scope="module")
def client(checkpoints):
    paths = [str(checkpoints[name]) for name in ("tiny-gpt", "tiny-lstm")]
    with TestClient(create_app(Settings(_env_file=None, checkpoints=paths, max_running=4, max_queued=4))) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(checkpoints):
    return load_checkpoint(checkpoints["tiny-gpt"])[1]


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny-gpt", **body})
    assert r.status_code == 200, r.text
    return r.json()


def scores(client, prompt, model="tiny-gpt"):
    return complete(client, model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)


@pytest.mark.parametrize("model", ["tiny-gpt", "tiny-lstm"])
def test_a_list_of_prompts_is_scored_as_each_prompt_alone(client, model):
    together = scores(client, PROMPTS, model)
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, together["choices"]):
        alone = scores(client, prompt, model)["choices"][0]
        assert choice["text"] == prompt and choice["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            alone["logprobs"]["token_logprobs"][1:], abs=1e-5
        )
        assert choice["logprobs"]["text_offset"] == alone["logprobs"]["text_offset"]
    tokens = sum(map(len, PROMPTS))  # one token a character
    assert together["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}


def test_token_ids_are_the_prompt_their_text_is(client, tokenizer):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    alone = scores(client, PROMPTS[0])["choices"][0]
    for body in (scores(client, ids[0]), scores(client, [ids[0]])):
        choice = body["choices"][0]
        assert choice["text"] == PROMPTS[0] and body["usage"]["prompt_tokens"] == len(ids[0])
        assert choice["logprobs"] == alone["logprobs"]
    by_text = scores(client, PROMPTS)
    listed = scores(client, ids)["choices"]
    assert [c["logprobs"]["token_logprobs"] for c in listed] == [
        c["logprobs"]["token_logprobs"] for c in by_text["choices"]
    ]


def test_n_choices_of_each_prompt_come_prompt_by_prompt_seeded_alike(client):
    both = complete(client, prompt=["Hello", "World"], n=2, max_tokens=6, seed=11)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    for i, prompt in enumerate(["Hello", "World"]):
        alone = complete(client, prompt=prompt, n=2, max_tokens=6, seed=11)["choices"]
        assert [c["text"] for c in both["choices"][2 * i : 2 * i + 2]] == [c["text"] for c in alone]
    assert both["usage"] == {"prompt_tokens": 10, "completion_tokens": 24, "total_tokens": 34}


def test_a_streamed_list_carries_each_choices_index_and_reassembles_to_the_whole(client):
    body = {"model": "tiny-gpt", "prompt": ["Hello", "World"], "max_tokens": 5, "seed": 2, "echo": True}
    whole = complete(client, **body)
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [data for _, data in parse_sse(r.text) if data != "[DONE]"]
    texts = ["", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]] and texts[1].startswith("World")
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize(
    "prompt, status, words",
    [
        ([], 422, "empty list"),
        ([[]], 422, "or a list of such lists"),
        (["Hello", 1], 422, "prompt must be a string"),
        ([-1], 422, "token ids (integers from 0)"),
        ([True], 422, "prompt must be"),
        (["Hello", "   "], 422, "empty or only whitespace"),
        (["Hello", "caf\u00e9"], 422, "not in the vocabulary"),
        ([[1, 2], [3, 10_000]], 422, "token ids [10000] not in the vocabulary (0..71) (model 'tiny-gpt')"),
        (["a"] * 5, 400, "prompt: 5 prompts x n: 10 choices, more than this server holds (8)"),
    ],
)
def test_a_prompt_of_no_shape_openai_takes_or_beyond_the_model_is_refused_naming_prompt(client, prompt, status, words):
    r = client.post("/v1/completions", json={"prompt": prompt, "n": 2, "max_tokens": 1})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def scoring_request(prompt, k=1):
    events = []
    return Request(list(prompt), SamplingParams(max_new_tokens=0, prompt_logprobs=k), events.append), events


@pytest.mark.parametrize("make, context", [(tiny_gpt, CONTEXT), (tiny_lstm, None)], ids=["gpt", "lstm"])
def test_the_engine_scores_prompts_queued_together_in_one_forward_a_window(make, context):
    model = make(50, **({"context_size": context} if context else {})).double()
    long = LSTM_CHUNK + 40 if context is None else 3 * CONTEXT  # more than one window
    prompts = [[i % 50 for i in range(7, 7 + long)], [3, 1, 4, 1, 5, 9, 2, 6], [8]]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    engine = Engine(model, max_batch=4)
    made = [scoring_request(p) for p in prompts]
    for req, _ in made:
        engine.submit(req)
    engine.step()  # queued for scoring
    engine.step()
    assert len(forwards) == 1  # every prompt's first window, in one forward
    assert [len(events) for _, events in made][1:] == [2, 2]  # the short ones are scored (and finished) at once
    while engine.busy():
        engine.step()
    windows = 2 if context is None else 5  # the long prompt's: 1..32, then 16 more each (95 tokens to score)
    assert len(forwards) == windows
    for prompt, (_, events) in zip(prompts, made):
        scored, end = events
        assert isinstance(scored, PromptLogprobs) and end == Finished("length")
        alone = score_prompt(model, context, prompt, 1)
        assert scored.logprobs[0] is None and scored.logprobs[1:] == pytest.approx(alone.logprobs[1:], abs=1e-9)
        assert [[i for i, _ in top] for top in scored.top] == [[i for i, _ in top] for top in alone.top]


def test_a_scoring_cancelled_while_queued_is_not_scored_and_the_others_are():
    model = tiny_gpt(50, context_size=CONTEXT).double()
    engine = Engine(model, max_batch=4)
    (a, a_events), (b, b_events) = scoring_request([1, 2, 3]), scoring_request([4, 5, 6])
    engine.submit(a)
    engine.submit(b)
    engine.step()  # queued
    engine.step()  # scored together
    assert len(a_events) == len(b_events) == 2
    c, c_events = scoring_request([7, 8, 9])
    engine.submit(c)
    engine._admit()  # queued for scoring, not yet scored
    c.cancel()
    engine.step()
    assert c_events == [Finished("cancelled")] and not engine.busy()
    assert len(engine.generate([1, 2], 2, temperature=0.0)) == 2  # the engine goes on


@pytest.mark.server
@pytest.mark.slow
def test_the_openai_client_sends_a_list_prompt_and_reads_a_choice_each(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    got = client.completions.create(model="tiny-gpt", prompt=["Hello", "World"], max_tokens=0, echo=True, logprobs=1)
    assert [(c.index, c.text) for c in got.choices] == [(0, "Hello"), (1, "World")]
    assert got.usage.prompt_tokens == 10 and got.choices[1].logprobs.tokens == list("World")
    ids = client.completions.create(model="tiny-gpt", prompt=[[5, 6, 7]], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].index == 0
