"""POST /tokenize and /detokenize: each served model's own tokenizer, in llama.cpp's and vLLM's field names; ids
round-trip to the text, and what a vocabulary cannot hold is a 422 that names it."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model import load_checkpoint

NAMES = ("tiny-gpt", "byte-gpt", "bpe-gpt", "tiny-lstm")
TEXT = {
    "tiny-gpt": "To be, or not to be",
    "byte-gpt": "Zoë ⚡ naïve",
    "bpe-gpt": "Zoë ⚡ the quick",
    "tiny-lstm": "All that",
}


@pytest.fixture(scope="module")
def client(checkpoints):
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in NAMES]))) as c:
        yield c


@pytest.mark.parametrize("name", NAMES)
def test_tokenize_gives_the_models_own_ids_and_detokenize_gives_the_text_back(client, checkpoints, name):
    _, tokenizer, _ = load_checkpoint(checkpoints[name])
    text = TEXT[name]
    llama = client.post("/tokenize", json={"model": name, "content": text, "add_special": True})
    vllm = client.post("/tokenize", json={"model": name, "prompt": text, "add_special_tokens": False})
    assert llama.status_code == vllm.status_code == 200
    assert llama.json() == vllm.json()
    body = llama.json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["model"] == name
    back = client.post("/detokenize", json={"model": name, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["content"] == back.json()["prompt"] == text


def test_max_model_len_is_the_context_and_null_for_the_lstm(client, checkpoints):
    gpt = load_checkpoint(checkpoints["tiny-gpt"])[0]
    assert client.post("/tokenize", json={"content": "To"}).json()["max_model_len"] == gpt.config.context_size
    assert client.post("/tokenize", json={"model": "tiny-lstm", "content": "All"}).json()["max_model_len"] is None


def test_with_pieces_gives_each_tokens_text_or_its_bytes(client):
    text = TEXT["byte-gpt"]
    tokens = client.post("/tokenize", json={"model": "byte-gpt", "content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in tokens] == list(text.encode())
    assert tokens[0] == {"id": ord("Z"), "piece": "Z"}
    # "ë" is two bytes: neither is UTF-8 alone, so each piece is its byte, as llama.cpp's server gives it
    assert tokens[2:4] == [{"id": 0xC3, "piece": [0xC3]}, {"id": 0xAB, "piece": [0xAB]}]
    pieces = client.post("/tokenize", json={"model": "bpe-gpt", "content": "the quick", "with_pieces": True})
    assert "".join(t["piece"] for t in pieces.json()["tokens"]) == "the quick"


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/tokenize", {"content": "To be ⚡"}, "content", "characters not in the vocabulary: '⚡'"),
        ("/tokenize", {"content": "a", "prompt": "a"}, "content", "one of content and prompt"),
        ("/tokenize", {}, "content", "one of content and prompt"),
        ("/detokenize", {"tokens": [0, 10_000, -1]}, "tokens", "[10000, -1] not in the vocabulary of model 'tiny-gpt'"),
    ],
)
def test_what_a_vocabulary_cannot_hold_is_a_422_naming_it(client, path, body, param, words):
    r = client.post(path, json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["code"] is None


def test_an_unknown_model_is_a_404(client):
    r = client.post("/detokenize", json={"model": "nope", "tokens": [1]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
