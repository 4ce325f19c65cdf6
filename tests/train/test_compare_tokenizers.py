"""python -m train.compare_tokenizers: equal training time per tokenizer, compared in bits per byte."""

import json
import math

import pytest

from model import load_checkpoint
from train import compare_tokenizers
from train.config import parse_config
from train.data import encode_text, full_loss, read_corpus

TINY = "--n-layer 1 --n-head 2 --hidden-size 16 --context-size 16 --batch-size 4 --eval-iters 2 --threads 1"


@pytest.mark.slow
def test_compare_trains_each_tokenizer_for_the_budget_and_reports_bits_per_byte(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_tokenizers, "CALIBRATION_ITERS", 6)
    out = tmp_path / "docs" / "tokenizers.md"
    argv = ["--corpus", f"tiny={corpus}", "--tokenizers", "char", "bpe:300", "--minutes", "0.02"]
    compare_tokenizers.main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(out), "--train-args", TINY])

    results = json.loads(out.with_suffix(".json").read_text())["tiny"]
    assert [(r["tokenizer"], r["vocab_size"]) for r in results] == [("char", 34), ("bpe", 300)]
    text, sha = read_corpus(corpus)
    for r, run in zip(results, ["char", "bpe-300"]):
        model, tokenizer, meta = load_checkpoint(tmp_path / "runs" / "tiny" / run)
        assert meta["train_config"]["max_iters"] == r["iters"] >= 1
        split = encode_text(tokenizer, text, sha)
        loss = full_loss(model, split.splits["val"], model.config.context_size)
        assert r["val_loss"] == pytest.approx(loss)
        assert r["val_bpb"] == pytest.approx(loss * len(split.splits["val"]) / split.bytes["val"] / math.log(2))
    report = out.read_text()
    assert "| char | 34 |" in report and "| bpe | 300 |" in report
    assert out.with_suffix(".png").stat().st_size > 0


def test_compare_reuses_a_finished_run_instead_of_training_it_again(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_tokenizers, "CALIBRATION_ITERS", 6)
    runs = tmp_path / "runs"
    first = compare_tokenizers.run_one(corpus, "char", 0.5, TINY.split(), runs)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_training(cfg):
        raise AssertionError("trained again")

    monkeypatch.setattr(compare_tokenizers, "train", no_training)
    assert compare_tokenizers.run_one(corpus, "char", 0.5, TINY.split(), runs) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_compare_with_a_corpus_not_named_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        compare_tokenizers.main(["--corpus", "just/a/path.txt"])
    assert "NAME=PATH" in capsys.readouterr().err


def test_measure_prints_the_table_for_runs_trained_elsewhere_without_training(corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    compare_tokenizers.train(parse_config(["--data", str(corpus), "--out", str(run), *TINY.split(), "--max-iters=2"]))

    def no_training(cfg):
        raise AssertionError("trained")

    monkeypatch.setattr(compare_tokenizers, "train", no_training)
    compare_tokenizers.main(["--corpus", f"tiny={corpus}", "--measure", str(run), "--out", str(tmp_path / "x.md")])
    model, tokenizer, _ = load_checkpoint(run)
    text, sha = read_corpus(corpus)
    split = encode_text(tokenizer, text, sha)
    loss = full_loss(model, split.splits["val"], model.config.context_size)
    bpb = loss * len(split.splits["val"]) / split.bytes["val"] / math.log(2)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| char | 34 |"))
    assert row.endswith(f"| {loss:.4f} | **{bpb:.3f}** |")
    assert not (tmp_path / "x.md").exists()


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:abc", "gpt2", "char:300"])
def test_a_bad_tokenizer_spec_is_refused_before_anything_trains(spec, corpus, tmp_path, monkeypatch, capsys):
    def no_training(cfg):
        raise AssertionError("trained")

    monkeypatch.setattr(compare_tokenizers, "train", no_training)
    with pytest.raises(SystemExit):
        compare_tokenizers.main(["--corpus", f"tiny={corpus}", "--tokenizers", "char", spec, "--runs", str(tmp_path)])
    assert spec in capsys.readouterr().err


def test_measure_names_a_run_it_cannot_measure(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit, match="cannot measure"):
        compare_tokenizers.main(["--corpus", f"tiny={corpus}", "--measure", str(tmp_path / "nothing")])


def test_a_finished_run_of_other_settings_is_trained_again(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_tokenizers, "CALIBRATION_ITERS", 6)
    runs = tmp_path / "runs"
    first = compare_tokenizers.run_one(corpus, "char", 0.5, TINY.split(), runs)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    compare_tokenizers.run_one(corpus, "char", 0.7, TINY.split(), runs)  # another budget
    assert (first / "model.safetensors").stat().st_mtime_ns != stamp
