"""logprobs, echo, n and OpenAI's penalties on /v1/completions (and logprobs on /generate), checked against
the model's own arithmetic; and a scored text against the trainer's loss on the bundled model."""

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import SHAKESPEARE
from service_helpers import parse_sse

from app.main import create_app
from app.settings import Settings
from model import load_checkpoint
from model.checkpoint import default_checkpoints
from train.data import full_loss, split_text


def serve(*paths):
    return TestClient(create_app(Settings(_env_file=None, checkpoints=[str(p) for p in paths])))


@pytest.fixture(scope="module")
def client(checkpoints):
    with serve(checkpoints["tiny-gpt"], checkpoints["byte-gpt"]) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(checkpoints):
    model, tokenizer, _ = load_checkpoint(checkpoints["tiny-gpt"])
    return model, tokenizer


def model_logprobs(model, ids):
    """(T, V) log-probabilities of the token after each of `ids`, by the model's plain forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny-gpt", "prompt": "Hello", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_tokens_carry_the_models_logprobs_and_top_alternatives(client, tiny):
    model, tokenizer = tiny
    choice = complete(client, max_tokens=12, temperature=0, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 12
    ids = tokenizer.encode("Hello" + choice["text"])
    expected = model_logprobs(model, ids[:-1])[4:]  # the rows that predict the 12 generated tokens
    for i, (token, logprob, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        want = expected[i].topk(3)
        assert [tokenizer.decode([j]) for j in want.indices.tolist()] == list(top)
        assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-5)
        assert logprob == pytest.approx(top[token], abs=1e-6)  # greedy: the likeliest token
    assert lp["text_offset"] == list(range(12))


def test_echo_with_max_tokens_0_scores_the_prompt_as_the_model_does(client, tiny):
    model, tokenizer = tiny
    prompt = "To be, or not to be"
    body = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    choice = body["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    lp = choice["logprobs"]
    assert lp["tokens"] == list(prompt) and lp["text_offset"] == list(range(len(prompt)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = tokenizer.encode(prompt)
    expected = model_logprobs(model, ids[:-1]).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp["token_logprobs"][1:] == pytest.approx(expected.tolist(), abs=1e-5)
    assert lp["top_logprobs"][1:] == [{}] * (len(prompt) - 1)


def test_echo_prepends_the_prompt_and_its_scores_to_the_same_completion(client):
    plain = complete(client, max_tokens=8, seed=3)["choices"][0]
    echoed = complete(client, max_tokens=8, seed=3, echo=True, logprobs=1)["choices"][0]
    assert echoed["text"] == "Hello" + plain["text"]
    lp = echoed["logprobs"]
    assert "".join(lp["tokens"]) == echoed["text"] and lp["text_offset"] == list(range(13))
    assert lp["token_logprobs"][0] is None and None not in lp["token_logprobs"][1:]


def test_a_prompt_longer_than_the_context_is_scored_whole(client, tiny):
    model, tokenizer = tiny
    prompt = "the quick brown fox jumps over the lazy dog. " * 3  # 135 characters, context 32
    lp = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and None not in lp["token_logprobs"][1:]
    ids = tokenizer.encode(prompt)
    # token 100 is scored by the window of 32 starting at 80 (windows start every 16), as the docs say
    assert lp["token_logprobs"][100] == pytest.approx(float(model_logprobs(model, ids[80:100])[-1, ids[100]]), abs=1e-5)


def test_byte_tokens_inside_a_character_are_shown_as_bytes(client):
    body = {"model": "byte-gpt", "prompt": "é!", "max_tokens": 0, "echo": True, "logprobs": 0}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["bytes:\\xc3", "bytes:\\xa9", "!"]
    assert lp["text_offset"] == [0, 0, 1]  # the second byte ends the character that starts at 0


def test_n_choices_are_the_single_requests_of_seed_seed_plus_1_and_so_on(client):
    many = complete(client, max_tokens=10, seed=7, n=3)
    singles = [complete(client, max_tokens=10, seed=7 + i)["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in many["choices"]] == singles
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert len(set(singles)) > 1  # they are different completions, not one repeated
    assert many["usage"] == {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}


def test_n_choices_stream_interleaved_and_reassemble_to_the_whole_response(client):
    whole = complete(client, max_tokens=10, seed=7, n=3, logprobs=1)
    body = {"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 10, "seed": 7, "n": 3, "logprobs": 1}
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [data for _, data in parse_sse(r.text)]
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == whole["usage"]
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks[:-2] if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [t for c in mine[:-1] for t in c["logprobs"]["token_logprobs"]] == choice["logprobs"]["token_logprobs"]
        assert mine[-1]["finish_reason"] == "length"


def test_frequency_and_presence_penalties_follow_openais_formula(client, tiny):
    model, tokenizer = tiny
    ids, counts = tokenizer.encode("Hello"), torch.zeros(tokenizer.vocab_size)
    for _ in range(15):  # greedy, each logit lowered by 0.7 per time generated and 0.4 once generated
        logits = model_logprobs(model, ids[-32:])[-1] - 0.7 * counts - 0.4 * (counts > 0)
        ids.append(int(logits.argmax()))
        counts[ids[-1]] += 1
    penalties = {"frequency_penalty": 0.7, "presence_penalty": 0.4}
    got = complete(client, max_tokens=15, temperature=0, **penalties)["choices"][0]["text"]
    assert got == tokenizer.decode(ids[5:])
    assert got != complete(client, max_tokens=15, temperature=0)["choices"][0]["text"]


def test_generate_streams_each_tokens_logprobs_and_returns_them_whole(client):
    body = {"model": "tiny-gpt", "prompt": "Hello", "max_new_tokens": 6, "temperature": 0, "logprobs": 2}
    events = parse_sse(client.post("/generate", json=body).text)
    tokens = [data for name, data in events if name == "token"]
    assert len(tokens) == 6
    for t in tokens:
        assert [a["id"] for a in t["top_logprobs"]][0] == t["id"] and len(t["top_logprobs"]) == 2
        assert t["logprob"] == t["top_logprobs"][0]["logprob"] <= 0
    whole = client.post("/generate", json={**body, "stream": False}).json()
    assert whole["logprobs"] == tokens
    assert "logprobs" not in client.post("/generate", json={**body, "stream": False, "logprobs": None}).json()


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"needs the Tiny Shakespeare corpus at {SHAKESPEARE}")
def test_scoring_the_validation_text_gives_the_trainers_loss_on_the_bundled_gpt():
    run = default_checkpoints()[0]
    model, tokenizer, _ = load_checkpoint(run)
    context = model.config.context_size
    val = torch.tensor(tokenizer.encode(split_text(SHAKESPEARE.read_text())[1][: 6 * context + 1]))
    with serve(run) as client:
        total = 0.0
        for k in range(6):  # the trainer's windows: inputs val[kC : (k+1)C], targets one further
            window = tokenizer.decode(val[k * context : (k + 1) * context + 1].tolist())
            body = {"prompt": window, "max_tokens": 0, "echo": True, "logprobs": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            total -= sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert total / (6 * context) == pytest.approx(full_loss(model, val, context), abs=1e-3)


def test_an_lstm_scores_a_prompt_with_its_whole_past(checkpoints):
    model, tokenizer, _ = load_checkpoint(checkpoints["tiny-lstm"])
    prompt = "the quick brown fox jumps over the lazy dog. " * 2
    with serve(checkpoints["tiny-lstm"]) as client:
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
        lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    ids = tokenizer.encode(prompt)
    expected = model_logprobs(model, ids[:-1]).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp["token_logprobs"][1:] == pytest.approx(expected.tolist(), abs=1e-5)


def test_more_choices_than_the_server_holds_is_a_400_naming_n(checkpoints):
    settings = Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], max_running=2, max_queued=1)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello", "n": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "(3)" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "Hello", "n": 3, "max_tokens": 2}).status_code == 200


def test_a_small_penalty_still_moves_a_large_bfloat16_logit():
    from model.sampling import SamplingParams, sample_next_token

    logits = torch.tensor([20.0, 20.0], dtype=torch.bfloat16)  # a step of bfloat16 at 20 is 0.125
    params = SamplingParams(temperature=0.0, presence_penalty=0.06)
    assert sample_next_token(logits, params, counts=torch.tensor([1.0, 0.0])) == 1
