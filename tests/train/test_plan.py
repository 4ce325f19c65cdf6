"""The Plan: what a run is (its model, tokenizer, and where it starts from), decided before anything is built."""

import dataclasses

import pytest

from model.checkpoint import file_sha256, model_tensors, save_checkpoint
from model.gpt import GPT
from model.tokenizer import ByteTokenizer
from train.config import parse_config
from train.data import corpus_for
from train.inputs import plan_run


def command(corpus, out, *extra):
    return parse_config(["--data", str(corpus), "--out", str(out), *map(str, extra)])


def test_a_fresh_run_takes_its_model_from_the_options_and_makes_its_own_tokenizer(corpus, tmp_path):
    plan = plan_run(command(corpus, tmp_path / "run", "--n-layer", 2, "--n-head", 2, "--hidden-size", 24))
    assert plan.architecture == {"context_size": 64, "hidden_size": 24, "n_layer": 2, "n_head": 2, "dropout": 0.0}
    assert (plan.tokenizer, plan.resume_state, plan.init_weights, plan.origin, plan.prepared) == (None,) * 4 + (False,)


def test_init_from_adopts_the_checkpoints_model_tokenizer_and_weights(corpus, tmp_path):
    base = GPT(vocab_size=256, context_size=16, hidden_size=24, n_layer=2, n_head=3, dropout=0.0, gelu="tanh")
    weights = tmp_path / "base" / "model.safetensors"
    save_checkpoint(weights, base, ByteTokenizer(), {})
    plan = plan_run(command(corpus, tmp_path / "run", "--init-from", tmp_path / "base"))
    cfg = plan.cfg
    assert (cfg.model, cfg.n_layer, cfg.n_head, cfg.hidden_size, cfg.context_size) == ("gpt", 2, 3, 24, 16)
    shape = {"context_size": 16, "hidden_size": 24, "n_layer": 2, "n_head": 3, "dropout": 0.0}
    assert plan.architecture == {**shape, "gelu": "tanh"}  # no option says the GELU form: the checkpoint's, kept
    assert plan.tokenizer.to_dict() == ByteTokenizer().to_dict()
    assert plan.init_weights.keys() == model_tensors(base).keys()
    assert plan.origin == {"path": str(weights.resolve()), "sha256": file_sha256(weights)}
    assert plan.resume_state is None
    assert corpus_for(plan).tokenizer is plan.tokenizer


def test_a_resumed_run_keeps_its_model_and_tokenizer_and_does_not_read_its_base_again(corpus, tmp_path):
    gone = {"path": str(tmp_path / "gone" / "model.safetensors"), "sha256": "0" * 64}
    state = {
        "model_type": "lstm",
        "config": {"vocab_size": 256, "hidden_size": 24, "n_layer": 3, "dropout": 0.1},
        "tokenizer": ByteTokenizer().to_dict(),
        "corpus_sha256": "not this corpus",
        "init_from": gone,
    }
    # what resumed_config makes of a fine-tuned run's settings: its --init-from, which no longer exists
    cfg = dataclasses.replace(command(corpus, tmp_path / "run", "--resume"), init_from=str(tmp_path / "gone"))
    plan = plan_run(cfg, state)
    assert (plan.cfg.model, plan.cfg.n_layer, plan.cfg.hidden_size) == ("lstm", 3, 24)
    assert plan.architecture == {"hidden_size": 24, "n_layer": 3, "dropout": cfg.dropout}  # the LSTM's fields only
    assert plan.tokenizer.kind == "byte" and plan.resume_state is state
    assert plan.init_weights is None and plan.origin == gone
    with pytest.raises(SystemExit, match="^cannot resume: --data is not the corpus this run was trained on$"):
        corpus_for(plan)
