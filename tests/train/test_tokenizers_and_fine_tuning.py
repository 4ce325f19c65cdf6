"""The trainer with a BPE tokenizer, bits per byte beside every loss, and fine-tuning (--init-from)."""

import hashlib
import json
import math

import pytest
import torch
from helpers import read_log

from model import BPETokenizer, load_checkpoint
from model.checkpoint import read_safetensors, write_safetensors
from train.config import parse_config
from train.data import ResegmentedSplit, make_tokenizer, split_text
from train.loop import train
from train.prepare import prepare

TINY = ["--n-layer", "1", "--n-head", "2", "--hidden-size", "16", "--context-size", "16", "--batch-size", "4"]
RUN = ["--eval-iters", "2", "--log-interval", "1", "--warmup-iters", "2"]


def config(corpus, out, *extra, tiny=True):
    return parse_config(["--data", str(corpus), "--out", str(out), *(TINY if tiny else []), *RUN, *map(str, extra)])


def test_trainer_with_bpe_learns_a_vocabulary_and_saves_it_in_the_checkpoint(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 2))
    model, tok, meta = load_checkpoint(tmp_path / "run")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300 == model.config.vocab_size
    text = corpus.read_text()
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < 0.7 * len(text.encode())  # merges were learned from this corpus
    assert meta["tokenizer"]["kind"] == "bpe"


def test_trainer_reports_bits_per_byte_beside_each_loss(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 2))
    _, tok, meta = load_checkpoint(tmp_path / "run")
    val_text = split_text(corpus.read_text())[1]
    bytes_per_token = len(val_text.encode()) / len(tok.encode(val_text))
    assert meta["bytes_per_token"]["val"] == pytest.approx(bytes_per_token)
    assert meta["best_val_bpb"] == pytest.approx(meta["best_val_loss"] / math.log(2) / bytes_per_token)
    for row in (r for r in read_log(tmp_path / "run") if r["kind"] == "eval"):
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) / bytes_per_token)


def test_bits_per_byte_of_a_character_model_on_ascii_text_are_its_bits_per_character(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", "--max-iters", 1))
    _, _, meta = load_checkpoint(tmp_path / "run")
    assert meta["best_val_bpb"] == pytest.approx(meta["best_val_loss"] / math.log(2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "300"], "--vocab-size is for --tokenizer bpe"),
        (["--tokenizer", "bpe", "--vocab-size", "100"], "at least 256|>= 256"),
    ],
)
def test_bad_vocab_size_is_a_usage_error_naming_it(args, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--out", "y", *args])
    assert "--vocab-size" in capsys.readouterr().err


# fine-tuning


@pytest.fixture
def base_run(corpus, tmp_path):
    """A finished character run on the corpus fixture, to fine-tune from."""
    out = tmp_path / "base"
    train(config(corpus, out, "--max-iters", 2))
    return out


def test_init_from_starts_from_the_checkpoints_weights_and_records_where_they_came_from(base_run, corpus, tmp_path):
    base, _, base_meta = load_checkpoint(base_run)
    out = tmp_path / "tuned"
    train(config(corpus, out, "--init-from", base_run, "--max-iters", 0, tiny=False))
    tuned, tok, meta = load_checkpoint(out)
    assert meta["config"] == base_meta["config"]  # the architecture came from the checkpoint, not the defaults
    assert tok.to_dict() == base_meta["tokenizer"]
    for name, tensor in base.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], tensor), name
    weights = base_run / "model.safetensors"
    assert meta["init_from"] == {
        "path": str(weights.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_init_from_trains_with_a_fresh_optimizer_and_schedule(base_run, corpus, tmp_path):
    out = tmp_path / "tuned"
    train(config(corpus, out, "--init-from", base_run, "--max-iters", 3, "--learning-rate", "3e-4", tiny=False))
    lrs = [r["lr"] for r in read_log(out) if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(3e-4 / 3)  # warmup starts again from the first step
    _, state = read_safetensors(out / "resume.safetensors")
    assert all(g["lr"] <= 3e-4 for g in state["param_groups"])
    base_state = read_safetensors(base_run / "resume.safetensors")[0]
    tuned_state = read_safetensors(out / "resume.safetensors")[0]
    steps = [k for k in tuned_state if k.endswith(".step")]
    assert steps and all(tuned_state[k].item() == 3 != base_state[k].item() for k in steps)


def test_init_from_refuses_text_with_characters_the_vocabulary_lacks_and_writes_nothing(base_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("Zoë said: «déjà vu» ⚡\n" * 200, encoding="utf-8")
    out = tmp_path / "tuned"
    with pytest.raises(SystemExit) as err:
        train(config(new, out, "--init-from", base_run, "--max-iters", 2, tiny=False))
    message = str(err.value)
    assert "'ë'" in message and "'⚡'" in message and "byte or BPE" in message
    assert f"on {new}:" in message  # the file, not the option's name
    assert not out.exists()


def test_init_from_a_bpe_model_takes_text_it_has_never_seen(corpus, tmp_path):
    base = tmp_path / "base"
    train(config(corpus, base, "--tokenizer", "bpe", "--vocab-size", 280, "--max-iters", 1))
    new = tmp_path / "new.txt"
    new.write_text("Zoë said: «déjà vu» ⚡ and the fox jumped.\n" * 60, encoding="utf-8")
    train(config(new, tmp_path / "tuned", "--init-from", base, "--max-iters", 2, tiny=False))
    _, tok, meta = load_checkpoint(tmp_path / "tuned")
    assert tok.to_dict() == load_checkpoint(base)[1].to_dict()
    assert meta["corpus_sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()


@pytest.mark.parametrize("flag", [["--n-layer", "2"], ["--tokenizer", "byte"], ["--context-size", "32"]])
def test_init_from_with_an_architecture_option_is_a_usage_error_naming_it(flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--out", "y", "--init-from", "ckpt", *flag])
    err = capsys.readouterr().err
    assert "--init-from" in err and flag[0] in err


def test_init_from_a_missing_checkpoint_says_so_and_writes_nothing(corpus, tmp_path):
    with pytest.raises(SystemExit, match="cannot fine-tune"):
        train(config(corpus, tmp_path / "tuned", "--init-from", tmp_path / "nothing", tiny=False))
    assert not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("flags", [["--tokenizer", "char"], ["--tokenizer", "bpe", "--vocab-size", "290"]])
def test_training_from_a_prepared_folder_with_another_tokenizer_is_refused_naming_its_own(corpus, tmp_path, flags):
    prepare([corpus], tmp_path / "data", tokenizer="bpe", vocab_size=300, workers=1)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="prepared with a bpe tokenizer of 300 tokens") as err:
        train(parse_config(["--data", str(tmp_path / "data"), "--out", str(out), *TINY, *RUN, *flags]))
    assert "--tokenizer" in str(err.value) and not out.exists()


def test_init_from_keeps_the_checkpoints_gelu_form(base_run, corpus, tmp_path):
    tensors, meta = read_safetensors(base_run / "model.safetensors")
    tanh = tmp_path / "tanh"
    write_safetensors(tanh / "model.safetensors", tensors, {**meta, "config": {**meta["config"], "gelu": "tanh"}})
    train(config(corpus, tmp_path / "tuned", "--init-from", tanh, "--max-iters", 1, tiny=False))
    model, _, meta = load_checkpoint(tmp_path / "tuned")
    assert meta["config"]["gelu"] == "tanh" and model.blocks[0].mlp.gelu.approximate == "tanh"


def test_a_fine_tuned_run_resumes_with_its_own_model_even_after_its_base_is_gone(base_run, corpus, tmp_path):
    tensors, meta = read_safetensors(base_run / "model.safetensors")
    base = tmp_path / "tanh"  # a base with GPT-2's GELU form, which the resumed run must keep
    write_safetensors(base / "model.safetensors", tensors, {**meta, "config": {**meta["config"], "gelu": "tanh"}})
    out = tmp_path / "tuned"
    train(config(corpus, out, "--init-from", base, "--max-iters", 2, tiny=False))
    origin = load_checkpoint(out)[2]["init_from"]
    (base / "model.safetensors").unlink()
    train(config(corpus, out, "--resume", "--max-iters", 4, tiny=False))  # no --init-from, default shape options
    model, _, meta = load_checkpoint(out)
    assert meta["config"]["gelu"] == "tanh" and meta["config"]["n_layer"] == 1
    assert meta["init_from"] == origin
    assert read_safetensors(out / "resume.safetensors")[1]["iter"] == 4


# BPE-dropout


def test_bpe_dropout_segments_the_same_bytes_differently_each_time(corpus):
    text = corpus.read_text()
    tok = make_tokenizer("bpe", text, 300)
    plain = tok.encode(text)
    encodings = [tok.with_dropout(0.3).encode(text) for _ in range(3)]
    assert all(tok.decode_bytes(ids) == text.encode() for ids in encodings)
    assert len({tuple(ids) for ids in encodings}) == 3  # three draws over ~2,000 merges: never all alike
    assert all(len(ids) > len(plain) for ids in encodings)  # skipped merges leave more, smaller tokens
    assert tok.encode(text) == plain  # the tokenizer itself stays plain


def test_a_resegmented_split_is_encoded_anew_after_a_whole_pass(corpus):
    text = split_text(corpus.read_text())[0]
    split = ResegmentedSplit(make_tokenizer("bpe", corpus.read_text(), 300), text, 0.3)
    first = split.ids
    split.drew(len(first) - 1)
    assert split.ids is first
    split.drew(1)
    assert split.ids.tolist() != first.tolist()
    assert split.encoder.decode_bytes(split.ids.tolist()) == text.encode()


def test_training_with_bpe_dropout_encodes_anew_and_saves_the_plain_tokenizer(corpus, tmp_path, monkeypatch):
    encodings = []
    encode = ResegmentedSplit._encode
    monkeypatch.setattr(ResegmentedSplit, "_encode", lambda self: encodings.append(1) or encode(self))
    flags = ["--tokenizer", "bpe", "--vocab-size", 300, "--bpe-dropout", 0.2, "--max-iters", 100]
    train(config(corpus, tmp_path / "run", *flags))
    assert len(encodings) >= 4  # 100 batches of 64 tokens pass over ~2,000 training tokens at least twice
    _, tok, meta = load_checkpoint(tmp_path / "run")
    assert json.loads(tok.to_dict()["json"])["model"]["dropout"] is None
    assert meta["train_config"]["bpe_dropout"] == 0.2
    val_text = split_text(corpus.read_text())[1]
    assert meta["bytes_per_token"]["val"] == pytest.approx(len(val_text.encode()) / len(tok.encode(val_text)))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bpe-dropout", "0.1"], "needs a BPE tokenizer, and this run's is char"),
        (["--tokenizer", "byte", "--bpe-dropout", "0.1"], "needs a BPE tokenizer, and this run's is byte"),
    ],
)
def test_bpe_dropout_without_bpe_is_refused_naming_the_tokenizer(corpus, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train(config(corpus, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()


def test_bpe_dropout_on_a_prepared_folder_is_refused(corpus, tmp_path):
    prepare([corpus], tmp_path / "data", tokenizer="bpe", vocab_size=300, workers=1)
    with pytest.raises(SystemExit, match="--bpe-dropout re-encodes text in memory"):
        train(parse_config(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--bpe-dropout", "0.1"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_bpe_dropout_out_of_range_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--out", "y", "--tokenizer", "bpe", "--bpe-dropout", value])
    assert "--bpe-dropout must be in [0, 1)" in capsys.readouterr().err
