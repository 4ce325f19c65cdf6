"""Hugging Face export: transformers loads the directory as GPT2LMHeadModel and PreTrainedTokenizerFast,
which give Quill's logits and Quill's token ids, for character, byte and BPE tokenizers alike."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import BPE_TEXT, REPO, tiny_gpt, tiny_lstm, trainer_env

from model import BPETokenizer, ByteTokenizer, CharTokenizer, save_checkpoint
from model.export import main

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: Thy drugs , are quick .\n\nNURSE: Her café, her crème!"  # " ," and " ." must survive decoding
TOKENIZERS = {
    "char": lambda: CharTokenizer.from_text(TEXT),
    "byte": ByteTokenizer,
    "bpe": lambda: BPETokenizer.train([BPE_TEXT * 20], vocab_size=300),
}


def lively(model):
    """Weights large enough that the two GELU forms give logits more than 1e-4 apart (the init's are not)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return model


def export(tmp_path, model, tokenizer, *extra):
    save_checkpoint(tmp_path / "run" / "model.safetensors", model, tokenizer, {})
    out = tmp_path / "hf"
    main([str(tmp_path / "run"), "--format", "hf", "--out", str(out), *extra])
    return out


def logits_diff(hf_model, model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        return (hf_model(x).logits - model(x)[0]).abs().max().item()


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_transformers_loads_the_export_with_quills_logits_and_token_ids(tmp_path, kind, gelu):
    tokenizer = TOKENIZERS[kind]()
    model = lively(tiny_gpt(tokenizer.vocab_size, context_size=64, gelu=gelu)).eval()
    out = export(tmp_path, model, tokenizer)

    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    ids = hf_tokenizer(TEXT).input_ids
    assert ids == tokenizer.encode(TEXT)
    assert hf_tokenizer.decode(ids) == TEXT

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf_model.config.activation_function == {"exact": "gelu", "tanh": "gelu_new"}[gelu]
    assert logits_diff(hf_model, model, ids[:64]) <= 1e-4
    # the tied head stays tied, as GPT-2's is
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
    # and the check tells the GELU forms apart: the other one is off by more than the tolerance
    other = {"exact": "gelu_new", "tanh": "gelu"}[gelu]
    wrong = transformers.GPT2LMHeadModel.from_pretrained(out, activation_function=other).eval()
    assert logits_diff(wrong, model, ids[:64]) > 1e-4


def test_a_byte_export_encodes_any_text_to_its_utf8_bytes(tmp_path):
    out = export(tmp_path, tiny_gpt(256), ByteTokenizer())
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = "Zoë ⚡ \t\r\n\x00 end"
    assert hf_tokenizer(text).input_ids == list(text.encode("utf-8"))
    assert hf_tokenizer.decode(list(text.encode("utf-8"))) == text


def test_export_hf_refuses_an_lstm_in_one_line(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT)
    save_checkpoint(tmp_path / "lstm.safetensors", tiny_lstm(tokenizer.vocab_size), tokenizer, {})
    with pytest.raises(SystemExit, match="is an LSTM; only GPT checkpoints export") as e:
        main([str(tmp_path / "lstm.safetensors"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_hf_refuses_an_existing_out_unless_told(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT)
    out = export(tmp_path, tiny_gpt(tokenizer.vocab_size), tokenizer)
    before = (out / "model.safetensors").read_bytes()
    save_checkpoint(tmp_path / "run" / "model.safetensors", tiny_gpt(tokenizer.vocab_size, seed=1), tokenizer, {})
    args = [str(tmp_path / "run"), "--format", "hf", "--out", str(out)]
    with pytest.raises(SystemExit, match="hf exists; pass --overwrite"):
        main(args)
    assert (out / "model.safetensors").read_bytes() == before
    main([*args, "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != before


def test_dtype_is_refused_for_hf(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT)
    save_checkpoint(tmp_path / "run" / "model.safetensors", tiny_gpt(tokenizer.vocab_size), tokenizer, {})
    with pytest.raises(SystemExit, match="--dtype is for --format gguf"):
        main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "f16"])
    assert not (tmp_path / "hf").exists()


def readme_hf_section():
    """The shell command and the Python snippet of README.md's export half of "Hugging Face GPT-2 in and out"."""
    section = (REPO / "README.md").read_text().split("## Hugging Face GPT-2 in and out", 1)[1]
    shell = [b for b in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M) if "--format hf" in b][0]
    python = re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)
    return shlex.split(shell.strip()), python


@pytest.mark.slow
def test_readme_hf_export_command_and_snippet_work_as_printed(tmp_path, capsys):
    words, snippet = readme_hf_section()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "shakespeare-gpt").symlink_to(REPO / "checkpoints" / "shakespeare-gpt")
    assert words[:2] == ["python", "-m"]
    done = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=trainer_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(snippet, {})  # as a user would paste it
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:") + 20


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_refuses_to_write_over_the_checkpoint_it_reads(fmt, tmp_path):
    tok = CharTokenizer("abc \n")
    run = tmp_path / "run"
    save_checkpoint(run / "model.safetensors", tiny_gpt(vocab_size=tok.vocab_size), tok, {})
    before = (run / "model.safetensors").read_bytes()
    out = run if fmt == "hf" else run / "model.safetensors"
    with pytest.raises(SystemExit, match="is the checkpoint itself"):
        main([str(run), "--format", fmt, "--out", str(out), "--overwrite"])
    assert (run / "model.safetensors").read_bytes() == before
