"""GET /v1/models and /v1/models/{name}: what each served model is and how it was trained."""

import hashlib

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model import load_checkpoint
from model.checkpoint import read_safetensors, write_safetensors
from train.config import parse_config
from train.loop import train

TINY = ["--n-layer", "1", "--n-head", "2", "--hidden-size", "16", "--context-size", "16", "--batch-size", "4"]
RUN = ["--eval-iters", "2", "--warmup-iters", "2", "--eval-interval", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A BPE run, and a run fine-tuned from it."""
    root = tmp_path_factory.mktemp("card")
    corpus = root / "corpus.txt"
    corpus.write_text("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind;\n" * 60)
    base, tuned = root / "base", root / "tuned"
    train(
        parse_config(
            [
                "--data",
                str(corpus),
                "--out",
                str(base),
                *TINY,
                *RUN,
                "--max-iters",
                "4",
                "--tokenizer",
                "bpe",
                "--vocab-size",
                "280",
            ]
        )
    )
    train(
        parse_config(["--data", str(corpus), "--out", str(tuned), *RUN, "--max-iters", "2", "--init-from", str(base)])
    )
    return base, tuned


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(r) for r in runs]))) as c:
        yield c


def test_model_card_reports_size_tokenizer_and_training(client, runs):
    card = client.get("/v1/models/base").json()
    model, tokenizer, meta = load_checkpoint(runs[0])
    assert card["id"] == "base" and card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["tokenizer"] == {"kind": "bpe", "vocab_size": 280} and card["context_size"] == 16
    for key in ("iter", "tokens_seen", "best_val_loss", "best_val_bpb", "corpus_sha256"):
        assert card["training"][key] == meta[key], key
    assert card["fine_tuned_from"] is None


def test_model_card_of_a_fine_tuned_model_names_its_origin(client, runs):
    card = client.get("/v1/models/tuned").json()
    weights = runs[0] / "model.safetensors"
    assert card["fine_tuned_from"] == {
        "path": str(weights.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_model_list_holds_a_card_for_each_served_model(client, runs):
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["base", "tuned"]
    for card, run in zip(listed, runs):
        _, tokenizer, meta = load_checkpoint(run)
        assert card["tokenizer"] == {"kind": "bpe", "vocab_size": tokenizer.vocab_size}
        assert card["training"]["iter"] == meta["iter"] and card["training"]["best_val_bpb"] == meta["best_val_bpb"]
    assert listed[0]["fine_tuned_from"] is None and listed[1]["fine_tuned_from"]["path"].endswith("model.safetensors")


def test_model_card_of_a_model_not_served_is_a_404_naming_the_served_ones(client):
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert "'nope'" in r.json()["error"]["message"] and "base" in r.json()["error"]["message"]


def test_model_card_turns_a_non_finite_number_in_the_metadata_into_null(runs, tmp_path):
    tensors, meta = read_safetensors(runs[0] / "model.safetensors")
    write_safetensors(tmp_path / "odd" / "model.safetensors", tensors, {**meta, "best_val_loss": float("inf")})
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(tmp_path / "odd")]))) as c:
        r = c.get("/v1/models/odd")
    assert r.status_code == 200 and r.json()["training"]["best_val_loss"] is None
