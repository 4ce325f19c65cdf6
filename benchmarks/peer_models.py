"""The models benchmarks/peers.py runs: the bundled GPT, random-weight ones of chosen shapes, and GPT-2 small.

    QUILL_GPT2_DIR=path/to/gpt2 python -m benchmarks.peers --models gpt2-small   # real GPT-2 small on disk
    python -m benchmarks.peers --models gpt2-small                               # random weights, same shape

Decode speed depends on the shape, not on the weight values. So without GPT-2 on disk, `gpt2-small` is
built as a user would download it: a Hugging Face directory holding a GPT2LMHeadModel of GPT2Config()'s shape
(12 layers, 12 heads, 768 wide, context 1024, tanh GELU) with seeded random weights, and a byte-level BPE
of GPT-2's 50,257 tokens (50,256 learned from the Python standard library's source, then <|endoftext|>,
where GPT-2 has it). Either directory becomes a Quill checkpoint through `python -m model.import_hf`.
"""

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

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
}
GPT2_ENV = "QUILL_GPT2_DIR"  # a local Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json)
GPT2_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}  # GPT2Config()'s
END_TOKEN = "<|endoftext|>"


def checkpoint_for(name, work):
    """A run directory for `name`: the bundled GPT, a random-weight 6L/384/ctx256 GPT, GPT-2 small, or the
    path itself. Built ones are kept under `work` for later runs."""
    bundled = next(p for p in default_checkpoints() if "gpt" in p.name)
    if name == "bundled":
        return bundled
    if name == "gpt2-small":
        return gpt2_small(work)
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


def write_random_hf(out, shape=GPT2_SHAPE, texts=None, seed=0):
    """Save a seeded random GPT2LMHeadModel of `shape` and its tokenizer to `out`, as save_pretrained does."""
    from transformers import GPT2Config, GPT2LMHeadModel  # slow to import: only when building

    tokenizer = train_tokenizer(shape["vocab_size"], stdlib_sources() if texts is None else texts)
    end = shape["vocab_size"] - 1
    config = GPT2Config(**shape, bos_token_id=end, eos_token_id=end)  # tanh GELU ("gelu_new"), as GPT-2
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(Path(out) / "tokenizer.json"))  # last: its presence says the directory is whole


def import_hf(hf_dir, run_dir):
    cmd = [sys.executable, "-m", "model.import_hf", str(hf_dir), "--out", str(run_dir), "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def gpt2_small(work, hf_dir=None):
    """A run directory under `work`: GPT-2 imported from `hf_dir` (or $QUILL_GPT2_DIR) when given, else the
    random-weight one, built once (about two minutes on 2 cores, most of it training the BPE)."""
    hf_dir = hf_dir or os.environ.get(GPT2_ENV)
    if hf_dir:
        weights = Path(hf_dir).resolve() / "model.safetensors"
        if not weights.is_file():
            raise SystemExit(f"{GPT2_ENV}={hf_dir}: no model.safetensors there (a local Hugging Face GPT-2 directory)")
        # one import per weights file: its path, size and time of change name the run directory
        stat = weights.stat()
        key = hashlib.sha256(f"{weights}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        run = work / f"gpt2-small-{key}"
        return run if (run / WEIGHTS_NAME).exists() else import_hf(weights.parent, run)
    run = work / "gpt2-small-random"
    if not (run / WEIGHTS_NAME).exists():
        hf = work / "gpt2-small-random-hf"
        if not (hf / "tokenizer.json").exists():
            write_random_hf(hf)
        import_hf(hf, run)
    return run
