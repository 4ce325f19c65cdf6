"""The models benchmarks/peers.py runs: the bundled GPT, random-weight ones of chosen shapes, GPT-2 small and
GPT-2 medium.

    QUILL_GPT2_DIR=path/to/gpt2 python -m benchmarks.peers --models gpt2-small                 # real GPT-2 small
    QUILL_GPT2_MEDIUM_DIR=path/to/gpt2-medium python -m benchmarks.peers --models gpt2-medium  # real GPT-2 medium
    python -m benchmarks.peers --models gpt2-small,gpt2-medium                 # random weights, the same shapes

Decode speed depends on the shape, not on the weight values. So without GPT-2 on disk, `gpt2-small` and
`gpt2-medium` are built as a user would download them: a Hugging Face directory holding a GPT2LMHeadModel of
the shape (small: GPT2Config()'s 12 layers, 12 heads, 768 wide; medium: 24 layers, 16 heads, 1024 wide; both
context 1024, tanh GELU) with seeded random weights, and GPT-2's own tokenizer, rebuilt from the ranks the
openai-whisper sdist carries (benchmarks/gpt2_tokenizer.py; `pip download` fetches it once into
.tools/gpt2-tokenizer). Where pip cannot fetch it, a byte-level BPE of GPT-2's 50,257 tokens stands in: 50,256
learned from the Python standard library's source, then <|endoftext|>, where GPT-2 has it (a line says so, and
the directories are named apart). Either directory becomes a Quill checkpoint through `python -m model.import_hf`,
and llama.cpp's convert_hf_to_gguf.py converts the same directory (benchmarks/peers.py).
"""

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from benchmarks.gpt2_tokenizer import build_tokenizer, fetch_ranks, read_ranks, save_hf
from model import GPT, load_checkpoint, save_checkpoint
from model.checkpoint import WEIGHTS_NAME, default_checkpoints
from model.tokenizer import BPETokenizer

ROOT = Path(__file__).resolve().parent.parent
# name: (label, new tokens per request, HTTP runs per figure). None tokens: the context minus the prompt.
# GPT-2 small's whole context would make a round last hours on 2 cores; its 32-stream runs of 128 tokens
# last minutes, long enough that one run a round, with the median over rounds, rides out a slow spell.
MODELS = {
    "bundled": ("bundled GPT", None, 3),
    "6L": ("6L/384/ctx256 (random)", None, 3),
    "gpt2-small": ("GPT-2 small", 128, 1),
    "gpt2-medium": ("GPT-2 medium", 128, 1),
}
GPT2_ENV = "QUILL_GPT2_DIR"  # a local Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json)
GPT2_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}  # GPT2Config()'s
GPT2_MEDIUM_SHAPE = GPT2_SHAPE | {"n_layer": 24, "n_head": 16, "n_embd": 1024}  # 355M parameters
# name: (the variable naming a local Hugging Face directory of its real weights, the shape of the random one)
GPT2S = {"gpt2-small": (GPT2_ENV, GPT2_SHAPE), "gpt2-medium": ("QUILL_GPT2_MEDIUM_DIR", GPT2_MEDIUM_SHAPE)}
END_TOKEN = "<|endoftext|>"


def checkpoint_for(name, work):
    """A run directory for `name`: the bundled GPT, a random-weight 6L/384/ctx256 GPT, GPT-2 small or medium,
    or the path itself. Built ones are kept under `work` for later runs."""
    bundled = next(p for p in default_checkpoints() if "gpt" in p.name)
    if name == "bundled":
        return bundled
    if name in GPT2S:
        return gpt2_run(name, work)
    if name != "6L":
        return Path(name)
    path = work / "gpt-6l-384-ctx256"
    if not (path / WEIGHTS_NAME).exists():
        tokenizer = load_checkpoint(bundled)[1]
        torch.manual_seed(0)
        path.mkdir(parents=True, exist_ok=True)
        model = GPT(tokenizer.vocab_size, 256, 384, 6, 6, 0.0)
        save_checkpoint(path / WEIGHTS_NAME, model, tokenizer, {"note": "random weights, for benchmarks"})
    return path


def stdlib_sources():
    """The text of the running Python's standard library (about 11 MB of .py), in a fixed order; the
    site-packages under it differ from one machine to the next, so they are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.relative_to(root).parts:
            yield path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(vocab_size, texts):
    """A GPT-2-style byte-level BPE of exactly `vocab_size` tokens: learned ones, then <|endoftext|> last."""
    tokenizer = BPETokenizer.train(texts, vocab_size - 1).tokenizer
    if tokenizer.get_vocab_size() != vocab_size - 1:
        raise SystemExit(f"the corpus yields only {tokenizer.get_vocab_size()} BPE tokens, not {vocab_size - 1}")
    tokenizer.add_special_tokens([END_TOKEN])
    return tokenizer


def write_random_hf(out, shape=GPT2_SHAPE, texts=None, seed=0, tokenizer=None):
    """Save a seeded random GPT2LMHeadModel of `shape` and its tokenizer to `out`, as save_pretrained does:
    `tokenizer` (GPT-2's own, a `tokenizers.Tokenizer`) when given, else a BPE learned from `texts` (default:
    the standard library)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # slow to import: only when building

    if tokenizer is None:
        tokenizer = train_tokenizer(shape["vocab_size"], stdlib_sources() if texts is None else texts)
    if tokenizer.get_vocab_size() != shape["vocab_size"]:
        raise ValueError(f"a tokenizer of {tokenizer.get_vocab_size()} tokens for a vocab_size {shape['vocab_size']}")
    end = shape["vocab_size"] - 1
    # n_ctx as GPT-2's own config.json has it (transformers 5 no longer writes it; llama.cpp's converter reads it)
    config = GPT2Config(**shape, n_ctx=shape["n_positions"], bos_token_id=end, eos_token_id=end)  # tanh GELU
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    save_hf(tokenizer, out, shape["n_positions"])  # last: tokenizer.json's presence says the directory is whole


def import_hf(hf_dir, run_dir):
    cmd = [sys.executable, "-m", "model.import_hf", str(hf_dir), "--out", str(run_dir), "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def gpt2_dirs(name, work, hf_dir=None):
    """(Hugging Face directory, run directory under `work`) of `name` in GPT2S: the real GPT-2 in `hf_dir` (or
    the directory its variable names) when given; else the random-weight one, whose Hugging Face directory is
    built here once (seconds with GPT-2's tokenizer; minutes when a BPE must be learned). The run directory
    may not be imported yet."""
    env, shape = GPT2S[name]
    hf_dir = hf_dir or os.environ.get(env)
    if hf_dir:
        weights = Path(hf_dir).resolve() / "model.safetensors"
        if not weights.is_file():
            raise SystemExit(f"{env}={hf_dir}: no model.safetensors there (a local Hugging Face GPT-2 directory)")
        # one import per weights file: its path, size and time of change name the run directory
        stat = weights.stat()
        key = hashlib.sha256(f"{weights}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        return weights.parent, work / f"{name}-{key}"
    ranks = fetch_ranks()
    if ranks is None:
        print(f"{name}: GPT-2's tokenizer is not to be had; a BPE learned from the standard library stands in")
    run = work / (f"{name}-gpt2vocab-random" if ranks else f"{name}-random")  # the BPE's: gpt2-small-random
    hf = run.with_name(f"{run.name}-hf")
    if not (hf / "tokenizer.json").exists():
        write_random_hf(hf, shape, tokenizer=build_tokenizer(read_ranks(ranks)) if ranks else None)
    return hf, run


def gpt2_run(name, work, hf_dir=None):
    """The run directory of `name` (gpt2_dirs), imported once."""
    hf, run = gpt2_dirs(name, work, hf_dir)
    return run if (run / WEIGHTS_NAME).exists() else import_hf(hf, run)


def gpt2_small(work, hf_dir=None):
    return gpt2_run("gpt2-small", work, hf_dir)


def hf_source(name, work):
    """The Hugging Face directory `name`'s checkpoint is imported from, or None (the bundled GPT, 6L, paths)."""
    return gpt2_dirs(name, work)[0] if name in GPT2S else None
