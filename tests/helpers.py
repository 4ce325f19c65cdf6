"""Tiny configurations and a way to run the trainer as a user would, shared by the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from model import GPT, LSTM

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

TINY_GPT = dict(vocab_size=40, context_size=16, hidden_size=32, n_layer=2, n_head=4, dropout=0.0)
TINY_LSTM = dict(vocab_size=40, hidden_size=32, n_layer=2, dropout=0.0)


def tiny_gpt(vocab_size=TINY_GPT["vocab_size"], seed=0, **overrides):
    """The tests' one small random-weight GPT: TINY_GPT's shape with `overrides`, weights from `seed`."""
    torch.manual_seed(seed)
    return GPT(**{**TINY_GPT, "vocab_size": vocab_size, **overrides})


def tiny_lstm(vocab_size=TINY_LSTM["vocab_size"], seed=0, **overrides):
    torch.manual_seed(seed)
    return LSTM(**{**TINY_LSTM, "vocab_size": vocab_size, **overrides})


# Trainer flags for a model small enough that a run takes a second or two.
TINY_TRAIN_ARGS = [
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--hidden-size",
    "32",
    "--context-size",
    "16",
    "--batch-size",
    "4",
    "--eval-iters",
    "2",
    "--log-interval",
    "1",
    "--warmup-iters",
    "2",
]


def trainer_command(*args, nproc=None):
    """`python -m train ARGS`, or under torchrun with `nproc` processes."""
    head = [sys.executable]
    if nproc:
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*head, "-m", "train", *map(str, args)]


def trainer_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_trainer(*args, nproc=None, timeout=120):
    """Run the trainer from the repo root; fail the test with its output if it fails."""
    proc = subprocess.run(
        trainer_command(*args, nproc=nproc),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def read_log(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "log.jsonl")]


# A few lines for byte-level BPE tests: commas, blank lines, and characters that are two bytes (é, ï).
BPE_TEXT = (
    "ROMEO:\nWhat, ho! Apothecary! Thy drugs are quick.\n\n"
    "JULIET:\nO happy dagger, this is thy sheath; there rust, and let me die.\n\n"
    "NURSE:\nHer café, her crème, her naïve old friar? Peace, peace!\n\n"
)
