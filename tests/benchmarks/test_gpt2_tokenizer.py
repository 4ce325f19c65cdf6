"""GPT-2's tokenizer rebuilt from tiktoken-style BPE ranks (benchmarks/gpt2_tokenizer.py), and the peer models."""

import base64
import hashlib
import io
import json
import tarfile

import pytest

from benchmarks import gpt2_tokenizer
from benchmarks.gpt2_tokenizer import CACHE, RANKS_NAME, build_tokenizer, fetch_ranks, merge_of, read_ranks, save_hf
from model.tokenizer import byte_level_chars

# a tiny BPE: the 256 bytes in GPT-2's order (byte_level_chars' printable ones first), then merges by rank
MERGED = [b" t", b"he", b" the", b"in", b" th", b"ing", b" thing", b"\xc3\xa9"]


def write_ranks(path, merged=MERGED):
    byte_order = sorted(range(256), key=lambda b: ord(byte_level_chars()[b]))
    tokens = [bytes([b]) for b in byte_order] + merged
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return read_ranks(path)


def test_each_merged_token_splits_into_the_pair_lower_ranks_build(tmp_path):
    ranks = write_ranks(tmp_path / "tiny.tiktoken")
    assert merge_of(b" the", ranks) == [b" t", b"he"]
    assert merge_of(b" th", ranks) == [b" t", b"h"]  # " the" came first but cannot be a part of " th"
    assert merge_of(b" thing", ranks) == [b" th", b"ing"]
    assert merge_of(b" thin", ranks | {b" thin": len(ranks)}) == [b" th", b"in"]
    with pytest.raises(ValueError, match="not one merge"):
        merge_of(b"xyz", ranks | {b"xyz": len(ranks)})  # no lower token joins two of its bytes


def test_rebuilt_tokenizer_encodes_by_rank_and_round_trips(tmp_path):
    ranks = write_ranks(tmp_path / "tiny.tiktoken")
    tokenizer = build_tokenizer(ranks)
    assert tokenizer.get_vocab_size() == 256 + len(MERGED) + 1
    assert tokenizer.token_to_id("<|endoftext|>") == 256 + len(MERGED)
    assert tokenizer.encode(" the thing").ids == [ranks[b" the"], ranks[b" thing"]]
    assert tokenizer.encode("he thing").ids == [ranks[b"he"], ranks[b" thing"]]  # no space prefix is added
    assert tokenizer.encode("é").ids == [ranks[b"\xc3\xa9"]]
    assert tokenizer.encode("a<|endoftext|>").ids == [ranks[b"a"], 256 + len(MERGED)]
    text = "the thing's  thing\n\tthé 日本 🙂"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert [" ".join(m) if isinstance(m, list) else m for m in merges][:3] == ["Ġ t", "h e", "Ġt he"]


def test_ranks_missing_a_byte_or_a_rank_are_refused(tmp_path):
    ranks = write_ranks(tmp_path / "tiny.tiktoken")
    with pytest.raises(ValueError, match="0, 1"):
        build_tokenizer({t: r for t, r in ranks.items() if r != 260})
    with pytest.raises(ValueError, match="256 single bytes"):
        build_tokenizer({t: r for t, r in ranks.items() if t != b"a"} | {b"ab": ranks[b"a"]})


def test_saved_directory_loads_in_transformers_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(write_ranks(tmp_path / "tiny.tiktoken"))
    save_hf(tokenizer, tmp_path / "hf", max_length=64)
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded(" the thing")["input_ids"] == tokenizer.encode(" the thing").ids
    assert loaded.eos_token == loaded.bos_token == "<|endoftext|>" and loaded.model_max_length == 64
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    assert len(vocab) == tokenizer.get_vocab_size() and vocab["Ġthe"] == 258
    assert (tmp_path / "hf" / "merges.txt").read_text().splitlines()[:3] == ["#version: 0.2", "Ġ t", "h e"]


def test_ranks_come_out_of_a_downloaded_sdist_only_with_the_expected_hash(tmp_path, monkeypatch, capsys):
    data = b"IQ== 0\n"
    for cache, expected in ((tmp_path / "good", hashlib.sha256(data).hexdigest()), (tmp_path / "bad", "0" * 64)):
        cache.mkdir()
        with tarfile.open(cache / "openai_whisper-1.tar.gz", "w:gz") as tar:  # pip download's file, already there
            info = tarfile.TarInfo(f"openai_whisper-1/whisper/assets/{RANKS_NAME}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        monkeypatch.setattr(gpt2_tokenizer, "RANKS_SHA256", expected)
        assert fetch_ranks(cache) == (cache / RANKS_NAME if cache.name == "good" else None)
    assert (tmp_path / "good" / RANKS_NAME).read_bytes() == data and not (tmp_path / "bad" / RANKS_NAME).exists()
    assert "SHA-256 differs" in capsys.readouterr().out


@pytest.mark.skipif(not (CACHE / RANKS_NAME).is_file(), reason="GPT-2's ranks are not in .tools/gpt2-tokenizer")
def test_the_real_ranks_give_gpt2s_ids():
    tokenizer = build_tokenizer(read_ranks(CACHE / RANKS_NAME))
    assert tokenizer.get_vocab_size() == 50257 and tokenizer.token_to_id("<|endoftext|>") == 50256
    assert tokenizer.encode("Hello world").ids == [15496, 995]
    assert tokenizer.encode(" the").ids == [262]
    assert tokenizer.encode("Hello, my dog is cute").ids == [15496, 11, 616, 3290, 318, 13779]
