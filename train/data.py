"""Corpus loading, the 90/10 split, tokenized corpora in memory or prepared on disk, a run's corpus as its
plan says, random batches, and the Tiny Shakespeare download."""

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_dict

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
DEFAULT_BPE_VOCAB = 2048
PREPARED_META = "meta.json"  # a prepared corpus folder's description, beside train.bin and val.bin


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
    except IsADirectoryError:
        raise SystemExit(
            f"--data {path} is a folder that python -m train.prepare did not make: prepare it first, e.g. "
            f"python -m train.prepare --data {path} --out data/{path.name or 'prepared'}, then --data data/"
            f"{path.name or 'prepared'}"
        ) from None
    except OSError as e:
        raise SystemExit(f"cannot read --data {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {not_utf8(path, e.start)}") from None
    return text, sha256_bytes(raw)


def not_utf8(path, at):
    """What to say of a corpus file that is not UTF-8 from byte `at` on: that, and how to convert it."""
    converted = Path(path).with_stem(Path(path).stem + "-utf8")
    return (
        f"{path} is not UTF-8 text (byte {at}): convert it first, e.g. from Latin-1 with "
        f"iconv -f latin1 -t utf-8 {path} > {converted}, and use {converted} in its place"
    )


def split_at(total, byte_at):
    """Where validation starts in a corpus of `total` UTF-8 bytes: 90% of the way in, moved forward to the
    start of a character. One rule for text in memory and prepared folders, whatever the tokenizer, so
    every model of a corpus is validated on the same text and bits per byte compare."""
    cut = int(TRAIN_FRACTION * total)
    while cut < total and 0x80 <= byte_at(cut) < 0xC0:  # a UTF-8 continuation byte
        cut += 1
    return cut


def split_text(text):
    """(training text, validation text): the first 90% of the bytes, and the last 10%."""
    raw = text.encode("utf-8")
    cut = split_at(len(raw), raw.__getitem__)
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def make_tokenizer(kind, text, vocab_size=None):
    """A new tokenizer for `text`: its characters, bytes, or a BPE learned from its training split only."""
    if kind == "bpe":
        return BPETokenizer.train([split_text(text)[0]], vocab_size or DEFAULT_BPE_VOCAB)
    return CharTokenizer.from_text(text) if kind == "char" else ByteTokenizer()


@dataclass
class Corpus:
    """A tokenized corpus: its splits' ids (tensors, or files on disk when prepared) and their sizes in
    UTF-8 bytes, which turn a loss per token into bits per byte."""

    sha256: str
    tokenizer: object
    splits: dict  # {"train": ids, "val": ids}
    bytes: dict  # {"train": n, "val": n}

    def bits_per_byte(self, name, loss):
        """A mean loss per token (nats) of split `name`, as bits per byte of its text: comparable across tokenizers."""
        return loss * len(self.splits[name]) / self.bytes[name] / math.log(2)

    def check_context(self, context_size):
        n = len(self.splits["val"])
        if n <= context_size + 1:
            raise SystemExit(
                f"the corpus is too small: its last 10% ({n} tokens) must exceed --context-size {context_size} + 1"
            )


def encode_text(tokenizer, text, sha256):
    """The Corpus of a text held in memory."""
    texts = dict(zip(("train", "val"), split_text(text)))
    splits = {name: torch.tensor(tokenizer.encode(t), dtype=torch.long) for name, t in texts.items()}
    return Corpus(sha256, tokenizer, splits, {name: len(t.encode("utf-8")) for name, t in texts.items()})


class ResegmentedSplit:
    """A BPE corpus's training split under BPE-dropout: encoded with `tokenizer.with_dropout(p)`, and again
    (in a background thread) each time batches have drawn as many tokens as it holds. Validation keeps
    the plain encoding, the one the model is served with."""

    def __init__(self, tokenizer, text, p):
        self.encoder, self.text = tokenizer.with_dropout(p), text
        self.ids, self.drawn = self._encode(), 0
        self._next = READER.submit(self._encode)

    def _encode(self):
        return torch.tensor(self.encoder.encode(self.text), dtype=torch.long)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, part):
        return self.ids[part]

    def drew(self, n):
        """`n` more tokens were drawn: after a whole pass's worth, the next encoding takes over."""
        self.drawn += n
        if self.drawn >= len(self.ids):
            self.ids, self.drawn = self._next.result(), 0
            self._next = READER.submit(self._encode)


def with_bpe_dropout(corpus, text, p):
    """`corpus` (a BPE text in memory) with its training split re-encoded under BPE-dropout `p`."""
    if corpus.tokenizer.kind != "bpe":
        raise SystemExit(f"--bpe-dropout needs a BPE tokenizer, and this run's is {corpus.tokenizer.kind}")
    corpus.splits["train"] = ResegmentedSplit(corpus.tokenizer, split_text(text)[0], p)
    return corpus


def encode_splits(tokenizer, text, context_size):
    """(training ids, validation ids) of a text, checked to hold a whole validation sequence."""
    corpus = encode_text(tokenizer, text, None)
    corpus.check_context(context_size)
    return corpus.splits["train"], corpus.splits["val"]


class TokenFile:
    """One split of a prepared corpus: token ids in a flat file, read with a positioned read per window, so
    resident memory stays small however large the file is. While a training step computes, the next
    batch's windows are read in a background thread (get_batch says which): a file larger than the page
    cache is a disk read a window."""

    def __init__(self, path, dtype, n_tokens):
        self.path, self.dtype, self.n_tokens = Path(path), np.dtype(dtype), n_tokens
        self._ahead = None  # (starts, length, future) of the batch being read ahead

    def __len__(self):
        return self.n_tokens

    def windows(self, starts, length):
        """(len(starts), length) int64: `length` tokens from each start; the batch read ahead if it is this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (starts, length):
            return ahead[2].result()
        return self._read(starts, length)

    def read_ahead(self, starts, length):
        """Begin reading these windows in the background, for the next windows() call to take."""
        self._ahead = (starts, length, READER.submit(self._read, starts, length))

    def _read(self, starts, length):
        size = self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:  # os.pread lets other threads run while it waits
            rows = [os.pread(f.fileno(), length * size, i * size) for i in starts]
        return torch.from_numpy(np.frombuffer(b"".join(rows), dtype=self.dtype).astype(np.int64)).view(-1, length)

    def __getitem__(self, part):
        ids = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return torch.from_numpy(ids[part].astype(np.int64))


READER = ThreadPoolExecutor(1, thread_name_prefix="quill-read-ahead")


def is_prepared(data):
    return data is not None and (Path(data) / PREPARED_META).is_file()


def load_prepared(directory):
    """The Corpus that `python -m train.prepare` wrote into `directory`, read lazily from disk."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / PREPARED_META).read_text())
        splits = {
            name: TokenFile(directory / f"{name}.bin", meta["dtype"], meta["splits"][name]["tokens"])
            for name in ("train", "val")
        }
        sizes = {name: meta["splits"][name]["bytes"] for name in ("train", "val")}
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        sha256 = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"--data {directory}: not a usable prepared corpus ({e}); run python -m train.prepare again"
        ) from None
    for ids in splits.values():
        expected = len(ids) * ids.dtype.itemsize
        if not ids.path.is_file() or ids.path.stat().st_size != expected:
            raise SystemExit(
                f"--data {directory}: {ids.path.name} is missing or not {expected} bytes; prepare it again"
            )
    return Corpus(sha256, tokenizer, splits, sizes)


def corpus_for(plan):
    """The Corpus of the run that `plan` (a train.inputs.Plan) describes, read and encoded in one pass. Its
    tokenizer is the plan's (the resumed run's or the fine-tuned checkpoint's), else the prepared folder's,
    else a new one of --tokenizer's kind."""
    cfg, fixed, resumed = plan.cfg, plan.tokenizer, plan.resume_state
    if plan.prepared:
        corpus = load_prepared(cfg.data)
        check_resumed_corpus(resumed, corpus.sha256)
        prepared = corpus.tokenizer
        if (cfg.tokenizer and cfg.tokenizer != prepared.kind) or cfg.vocab_size not in (None, prepared.vocab_size):
            raise SystemExit(
                f"--data {cfg.data} was prepared with a {prepared.kind} tokenizer of {prepared.vocab_size} tokens: "
                "drop --tokenizer and --vocab-size, or prepare it again"
            )
        if fixed is not None and fixed.to_dict() != prepared.to_dict():
            source = "the resumed run's" if resumed else "the checkpoint's"
            raise SystemExit(
                f"--data {cfg.data} was prepared with another tokenizer than {source}: prepare it again with "
                f"python -m train.prepare --tokenizer {cfg.out if resumed else cfg.init_from}"
            )
    else:
        text, sha = read_corpus(cfg.data)
        check_resumed_corpus(resumed, sha)
        if fixed is None:
            corpus = encode_text(make_tokenizer(cfg.tokenizer or "char", text, cfg.vocab_size), text, sha)
        elif resumed:
            corpus = encode_text(fixed, text, sha)
        else:
            corpus = encode_for_fine_tuning(fixed, text, sha, cfg.init_from, cfg.data)
        if cfg.bpe_dropout:
            corpus = with_bpe_dropout(corpus, text, cfg.bpe_dropout)
    corpus.check_context(cfg.context_size)
    return corpus


def check_resumed_corpus(resume_state, sha256):
    if resume_state and resume_state["corpus_sha256"] != sha256:
        raise SystemExit("cannot resume: --data is not the corpus this run was trained on")


def encode_for_fine_tuning(tokenizer, text, sha, source, data):
    try:
        return encode_text(tokenizer, text, sha)
    except ValueError as e:  # a character vocabulary that lacks some of the new text's characters
        raise SystemExit(
            f"cannot fine-tune {source} on {data}: the text has {e}; a character model can only learn "
            "text made of its characters: train a byte or BPE model instead (--tokenizer byte or bpe)"
        ) from None


def get_batch(data, batch_size, context_size, generator, device="cpu"):
    """`batch_size` random windows of `data` (a tensor, or a TokenFile) as inputs and next-token targets."""

    def starts(g):
        return torch.randint(len(data) - context_size, (batch_size,), generator=g).tolist()

    ix = starts(generator)
    if isinstance(data, TokenFile):
        rows = data.windows(ix, context_size + 1)
        # the next call's windows, drawn from a copy of the generator (its own state stays as it was), are
        # read while this batch computes
        data.read_ahead(starts(torch.Generator().set_state(generator.get_state())), context_size + 1)
    else:
        rows = torch.stack([data[i : i + context_size + 1] for i in ix])
        if isinstance(data, ResegmentedSplit):
            data.drew(rows.numel())
    if torch.device(device).type == "cuda":
        # one copy of the (B, T+1) windows from pinned memory, queued without waiting: it overlaps the GPU's
        # work on the step before, where a copy from pageable memory would stage it and block
        rows = rows.pin_memory().to(device, non_blocking=True)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each
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
