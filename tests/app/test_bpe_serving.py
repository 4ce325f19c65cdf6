"""A BPE checkpoint served: any text is a prompt, streamed deltas are whole characters, and the model
list says which tokenizer each model speaks."""

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import parse_sse

from app.main import create_app
from app.settings import Settings
from model import load_checkpoint

PROMPT = "Zoë ⚡ the quick"  # characters the tokenizer never saw in training; 10 tokens, well inside the context


@pytest.fixture(scope="module")
def client(checkpoints):
    names = ("bpe-gpt", "tiny-gpt")
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in names]))) as c:
        yield c


@pytest.fixture(scope="module")
def bpe(checkpoints):
    return load_checkpoint(checkpoints["bpe-gpt"])


def greedy_text(model, tokenizer, prompt, n):
    """The oracle: GPT.generate at a vanishing temperature (greedy), decoded by the tokenizer."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, n, temperature=1e-9)[0, ids.shape[1] :].tolist()
    return tokenizer.decode(out)


def test_v1_models_reports_each_models_tokenizer_and_size(client, bpe):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    model, tokenizer, _ = bpe
    assert models["bpe-gpt"]["tokenizer"] == {"kind": "bpe", "vocab_size": tokenizer.vocab_size}
    assert models["tiny-gpt"]["tokenizer"]["kind"] == "char"
    assert models["bpe-gpt"]["context_size"] == model.config.context_size
    assert models["bpe-gpt"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_bpe_model_streams_greedy_text_equal_to_gpt_generate(client, bpe):
    r = client.post("/generate", json={"model": "bpe-gpt", "prompt": PROMPT, "max_new_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    deltas = [data["text"] for name, data in events if name == "token"]
    done = events[-1][1]
    model, tokenizer, _ = bpe
    assert "".join(deltas) == done["text"] == greedy_text(model, tokenizer, PROMPT, 12)
    assert done["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert done["usage"]["completion_tokens"] == 12


def test_bpe_model_answers_openai_completions(client, bpe):
    body = {"model": "bpe-gpt", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    model, tokenizer, _ = bpe
    assert r.json()["choices"][0]["text"] == greedy_text(model, tokenizer, PROMPT, 5)
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT))


def test_the_same_prompt_to_a_character_model_is_refused_naming_the_characters(client):
    r = client.post("/generate", json={"model": "tiny-gpt", "prompt": PROMPT, "stream": False})
    assert r.status_code == 422
    assert "'ë'" in r.json()["error"]["message"] and "'⚡'" in r.json()["error"]["message"]
