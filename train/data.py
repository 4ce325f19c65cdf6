"""Corpus loading, the 90/10 split, random batches, and the Tiny Shakespeare download."""

import hashlib
import os
from pathlib import Path

import torch

from model.tokenizer import ByteTokenizer, CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def download_shakespeare(cache_dir=None):
    import httpx

    cache = Path(cache_dir or os.environ.get("QUILL_CACHE", Path.home() / ".cache" / "quill"))
    path = cache / "tinyshakespeare.txt"
    if path.exists() and sha256_bytes(path.read_bytes()) == SHAKESPEARE_SHA256:
        return path
    try:
        data = httpx.get(SHAKESPEARE_URL, timeout=30, follow_redirects=True).raise_for_status().content
    except httpx.HTTPError as e:
        raise SystemExit(
            f"could not download Tiny Shakespeare ({e}); offline, pass a local file: --data PATH"
        ) from None
    if sha256_bytes(data) != SHAKESPEARE_SHA256:
        raise SystemExit("downloaded Tiny Shakespeare has the wrong sha256; pass a local copy with --data PATH")
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_corpus(data):
    """Return (text, sha256 of its bytes); a clear error for a missing or non-UTF-8 file."""
    path = download_shakespeare() if data == "shakespeare" else Path(data)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise SystemExit(f"cannot read --data {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {path} is not UTF-8 text (byte {e.start}); convert it first") from None
    return text, sha256_bytes(raw)


def make_tokenizer(kind, text):
    return CharTokenizer.from_text(text) if kind == "char" else ByteTokenizer()


def split(ids, context_size):
    """The first 90% trains, the last 10% validates; each must hold one whole sequence."""
    ids = torch.tensor(ids, dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= context_size + 1:
        raise SystemExit(
            f"the corpus is too small: its last 10% ({len(val)} tokens) must exceed --context-size {context_size} + 1"
        )
    return train, val


def get_batch(data, batch_size, context_size, generator, device="cpu"):
    ix = torch.randint(len(data) - context_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + context_size] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + context_size] for i in ix])
    return x.to(device), y.to(device)


@torch.no_grad()
def full_loss(model, data, context_size, batch_size=64, device="cpu"):
    """Mean cross-entropy over every token of `data`, read in non-overlapping windows."""
    n = (len(data) - 1) // context_size * context_size
    x = data[:n].view(-1, context_size)
    y = data[1 : n + 1].view(-1, context_size)
    total = 0.0
    for i in range(0, len(x), batch_size):
        _, loss = model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        total += loss.item() * len(x[i : i + batch_size])
    return total / len(x)
