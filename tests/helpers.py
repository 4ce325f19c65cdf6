"""Tiny configurations and a way to run the trainer as a user would, shared by the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import GPT, LSTM
from model.request import Finished, Token

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

END = "<|endoftext|>"


def gpt2_tokenizer():
    """A byte-level BPE made as GPT-2's is: its byte alphabet, merges, and <|endoftext|> as an added token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([BPE_TEXT * 10], trainer)
    return tokenizer


def save_gpt2(path, activation="gelu_new", **config):
    """A random GPT2LMHeadModel and its tokenizer.json saved in `path` as save_pretrained writes them."""
    import transformers  # a test extra: only the tests that build a GPT-2 need it

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        activation_function=activation, initializer_range=0.2, bos_token_id=tokenizer.token_to_id(END),
        eos_token_id=tokenizer.token_to_id(END), **config,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and norms at 0 and 1: make them count
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path / "tokenizer.json"))
    return model, tokenizer


class Recorder:
    """A request's emit callback that keeps every event."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self):
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def finish(self):
        return self.events[-1] if self.events and isinstance(self.events[-1], Finished) else None
