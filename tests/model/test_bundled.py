"""The checkpoints shipped under checkpoints/: they load, explain themselves, and are good enough."""

import pytest
from helpers import REPO as ROOT

from model import load_checkpoint
from train.data import SHAKESPEARE_SHA256, encode_splits, full_loss, read_corpus

GPT_RUN = ROOT / "checkpoints" / "shakespeare-gpt"
LSTM_RUN = ROOT / "checkpoints" / "shakespeare-lstm"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MAX_BYTES = 25 * 1024 * 1024


@pytest.mark.parametrize("run", [GPT_RUN, LSTM_RUN], ids=["gpt", "lstm"])
def test_bundled_checkpoint_loads_small_and_with_its_training_record(run):
    model, tokenizer, meta = load_checkpoint(run)
    assert (run / "model.safetensors").stat().st_size <= MAX_BYTES
    assert meta["model_type"] in ("gpt", "lstm")
    assert meta["corpus_sha256"] == SHAKESPEARE_SHA256
    assert meta["tokens_seen"] > 0 and meta["train_seconds"] > 0
    assert meta["train_seconds"] <= 90 * 60
    assert tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:"


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="Tiny Shakespeare is not at ../shared/data")
def test_bundled_gpt_validation_loss_on_the_standard_split_is_at_most_1_60():
    model, tokenizer, meta = load_checkpoint(GPT_RUN)
    text, _ = read_corpus(CORPUS)
    _, val = encode_splits(tokenizer, text, model.context_size)  # the last 10% of the corpus
    assert full_loss(model, val, model.context_size) <= 1.60
