"""The peer benchmark's model list: GPT-2 small and medium, built as a user would, with GPT-2's tokenizer or the
standard library's BPE in its place."""

import pytest
import torch
from test_gpt2_tokenizer import MERGED, write_ranks  # tests/benchmarks is on sys.path (no __init__.py)

from benchmarks import peer_models
from benchmarks.peer_models import GPT2_MEDIUM_SHAPE, GPT2S, MODELS, gpt2_dirs, gpt2_run, hf_source
from model import load_checkpoint

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 256 + len(MERGED) + 1}


def test_gpt2_medium_is_listed_with_its_shape_and_355m_parameters():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert MODELS["gpt2-medium"] == ("GPT-2 medium", 128, 1) and MODELS["gpt2-small"][1:] == (128, 1)
    assert GPT2S["gpt2-medium"] == ("QUILL_GPT2_MEDIUM_DIR", GPT2_MEDIUM_SHAPE)
    with torch.device("meta"):  # the shape alone, no weights
        model = GPT2LMHeadModel(GPT2Config(**GPT2_MEDIUM_SHAPE))
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (24, 16, 1024)
    assert sum(p.numel() for p in model.parameters()) == 354_823_168  # GPT-2 medium's, the LM head tied


def test_peers_help_and_models_option_know_gpt2_medium(capsys):
    from benchmarks.peers import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "gpt2-medium" in capsys.readouterr().out
    assert parse_args(["--models", "gpt2-small,gpt2-medium"]).models == ["gpt2-small", "gpt2-medium"]


def test_hf_source_is_the_directory_a_gpt2_is_imported_from(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("QUILL_GPT2_MEDIUM_DIR", str(tmp_path / "real"))
    assert hf_source("gpt2-medium", tmp_path) == (tmp_path / "real").resolve()
    hf, run = gpt2_dirs("gpt2-medium", tmp_path)
    assert run.parent == tmp_path and run.name.startswith("gpt2-medium-") and not run.name.endswith("-random")
    assert hf_source("bundled", tmp_path) is None and hf_source("6L", tmp_path) is None


@pytest.mark.slow
@pytest.mark.parametrize("gpt2_vocab", [True, False])
def test_random_gpt2_is_built_with_gpt2s_tokenizer_or_else_the_learned_bpe(tmp_path, monkeypatch, gpt2_vocab):
    ranks = tmp_path / "tiny.tiktoken"
    write_ranks(ranks)
    monkeypatch.setattr(peer_models, "fetch_ranks", lambda: ranks if gpt2_vocab else None)
    monkeypatch.setattr(peer_models, "stdlib_sources", lambda: [" the thing\n" * 50 + "".join(map(chr, range(256)))])
    monkeypatch.setitem(GPT2S, "gpt2-tiny", ("QUILL_TEST_UNSET_GPT2_DIR", TINY))
    run = gpt2_run("gpt2-tiny", tmp_path / "work")
    assert run.name == ("gpt2-tiny-gpt2vocab-random" if gpt2_vocab else "gpt2-tiny-random")
    hf = run.with_name(run.name + "-hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= {
        p.name for p in hf.iterdir()
    }
    model, tokenizer, _ = load_checkpoint(run)
    assert model.config.n_layer == 1 and tokenizer.vocab_size == TINY["vocab_size"]
    assert tokenizer.decode([TINY["vocab_size"] - 1]) == "<|endoftext|>"
    if gpt2_vocab:  # the ranks' ids: " the" is rank 258, " thing" 262
        assert tokenizer.encode(" the thing") == [258, 262]
    assert gpt2_run("gpt2-tiny", tmp_path / "work") == run  # built once
