"""python -m train.prepare --data PATH [PATH ...] --out DATA_DIR: tokenize a corpus once, in parallel worker
processes, into flat token files that `python -m train --data DATA_DIR` reads through memory maps.

The corpus is the input files' bytes, concatenated in sorted order, and is never held in memory whole: each
file is streamed in blocks and cut into chunks that tokenize independently. Pass 1 (char and bpe only) learns
the tokenizer; pass 2 tokenizes the chunks in order into train.bin and val.bin, and meta.json comes last."""

import argparse
import bisect
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.checkpoint import CheckpointError, atomic_path, atomic_write_bytes, read_safetensors, resolve_checkpoint_path
from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, safe_cut, tokenizer_from_dict
from train.data import DEFAULT_BPE_VOCAB, PREPARED_META, not_utf8, split_at

# Bytes read at a time, about the size of a chunk. Not megabytes: `tokenizers` holds ~150 bytes per byte while
# it encodes (a 4 MB chunk peaked at 700 MB in a worker) and its BPE training pulls 256 texts at a time before
# counting them (a gigabyte of 4 MB chunks). 256 KB chunks measured faster too, and keep both small.
BLOCK_BYTES = 256 << 10
DEFAULT_GLOBS = ("*.txt", "*.md")


@dataclass(frozen=True)
class Segment:
    """Bytes [start, start + length) of one input file, all in one split."""

    path: Path
    start: int
    length: int
    split: str


def find_inputs(paths, globs):
    """The files that `paths` name (folders searched recursively for `globs`), sorted and each once."""
    found = {}
    for path in map(Path, paths):
        if path.is_dir():
            matches = [p for pattern in globs for p in path.rglob(pattern) if p.is_file()]
        elif path.is_file():
            matches = [path]
        else:
            raise SystemExit(f"--data {path}: no such file or folder")
        for p in matches:
            found.setdefault(p.resolve(), p)  # the same file named twice counts once
    if not found:
        raise SystemExit(
            f"--data {' '.join(map(str, paths))}: no files match {' '.join(globs)}; --glob sets the file name "
            "patterns searched for in folders, and may be repeated: e.g. --glob '*.py' --glob '*.rst'"
        )
    return sorted(found.values(), key=str)


def plan_segments(files, sizes, cut):
    """Each file's bytes before the split point (training) and after it (validation)."""
    segments, offset = [], 0
    for path, size in zip(files, sizes):
        for split, lo, hi in (("train", 0, cut - offset), ("val", cut - offset, size)):
            lo, hi = max(lo, 0), min(hi, size)
            if hi > lo:
                segments.append(Segment(path, lo, hi - lo, split))
        offset += size
    return segments


def byte_reader(files, sizes):
    """byte_at(i): the i-th byte of the files' concatenation, read with a seek (split_at needs only a few)."""
    ends = np.cumsum(sizes).tolist()

    def byte_at(i):
        n = bisect.bisect_right(ends, i)
        with open(files[n], "rb") as f:
            f.seek(i - (ends[n] - sizes[n]))
            return f.read(1)[0]

    return byte_at


def char_start(data):
    """Where the last character of `data` starts: bytes after it wait for the next block, so a character
    split between blocks decodes whole."""
    i = len(data) - 1
    while i > 0 and i > len(data) - 4 and 0x80 <= data[i] < 0xC0:  # UTF-8 continuation bytes
        i -= 1
    return max(i, 0)


def decoded_blocks(segment, block_bytes, on_read):
    """The segment's text, a block at a time; a clear error naming the file and byte where it is not UTF-8."""
    try:
        with open(segment.path, "rb") as f:
            f.seek(segment.start)
            left, carry, offset = segment.length, b"", segment.start  # offset: where `carry` starts in the file
            while left:
                raw = f.read(min(block_bytes, left))
                if not raw:
                    raise SystemExit(f"{segment.path} got shorter while it was being prepared")
                left -= len(raw)
                on_read(segment, raw)
                data = carry + raw
                end = len(data) if not left else char_start(data)
                try:
                    text = data[:end].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SystemExit(not_utf8(segment.path, offset + e.start)) from None
                carry, offset = data[end:], offset + end
                yield text
    except OSError as e:
        raise SystemExit(f"cannot read {segment.path}: {e.strerror}") from None


def chunks(segments, block_bytes, on_read=lambda segment, raw: None):
    """(split, text) pieces of about `block_bytes`, in corpus order, each inside one segment: cut at file
    boundaries, at the split point (each split is tokenized apart, as in memory), and otherwise at safe_cut."""
    for segment in segments:
        pending = ""
        for text in decoded_blocks(segment, block_bytes, on_read):
            text = pending + text
            cut = safe_cut(text)
            cut = len(text) if cut is None else cut  # no safe cut in a whole block: cut anyway, at a character
            if cut:
                yield segment.split, text[:cut]
            pending = text[cut:]
        if pending:
            yield segment.split, pending


def token_dtype(vocab_size):
    """The smallest unsigned type that holds every id: half the disk and page cache when the vocab fits."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def checkpoint_tokenizer(path):
    weights = resolve_checkpoint_path(path)
    try:
        meta = read_safetensors(weights)[1]
        return tokenizer_from_dict(meta["tokenizer"])
    except (CheckpointError, KeyError, ValueError) as e:
        raise SystemExit(f"--tokenizer {path}: not char, byte, bpe or a usable checkpoint ({e})") from None


def learn_tokenizer(kind, vocab_size, segments, block_bytes):
    """Pass 1: the tokenizer, from the same text that make_tokenizer(kind, text) would see in memory."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("char", "bpe"):
        return checkpoint_tokenizer(kind)
    if kind == "bpe":
        segments = [s for s in segments if s.split == "train"]  # never learned from the validation text
    with tqdm(total=sum(s.length for s in segments), unit="B", unit_scale=True, desc=f"pass 1 ({kind})") as bar:
        texts = (text for _, text in chunks(segments, block_bytes, lambda _, raw: bar.update(len(raw))))
        if kind == "bpe":
            return BPETokenizer.train(texts, vocab_size or DEFAULT_BPE_VOCAB)
        chars = set()
        for text in texts:
            chars.update(text)
        return CharTokenizer(sorted(chars))


def start_worker(tokenizer_dict, dtype):
    global worker_tokenizer, worker_dtype
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one line, not one per worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; no threads inside them
    worker_tokenizer, worker_dtype = tokenizer_from_dict(tokenizer_dict), np.dtype(dtype).newbyteorder("<")


def start_pool(context, workers, args):
    """The worker pool, started with Ctrl-C held back: one that arrives while workers fork leaves a half-made
    pool that never shuts down; held, it arrives once the pool is whole, and the pool is torn down."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return context.Pool(workers, initializer=start_worker, initargs=args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def encode_chunk(text):
    return np.asarray(worker_tokenizer.encode(text), dtype=worker_dtype)


def tokenize(tokenizer, segments, total, files_out, workers, block_bytes, on_read):
    """Pass 2: encode the chunks in worker processes and append their ids, in corpus order, to files_out
    ({split: open file}). Returns {split: tokens}."""
    counts = dict.fromkeys(files_out, 0)
    # fork starts workers in milliseconds (spawn re-imports torch in each); it is safe on Linux only
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    args = (tokenizer.to_dict(), token_dtype(tokenizer.vocab_size))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="pass 2 (tokenize)")
    with bar:
        pool, in_flight = start_pool(context, workers, args), deque()

        def write_until(n):
            while len(in_flight) > n:
                split, result = in_flight.popleft()
                try:
                    ids = result.get()
                except ValueError as e:  # a checkpoint's character vocabulary that lacks some of the text
                    raise SystemExit(
                        f"--tokenizer cannot encode the corpus: the text has {e}; a character model knows only its "
                        "own characters: fine-tune a byte or BPE model instead"
                    ) from None
                files_out[split].write(ids.tobytes())
                counts[split] += len(ids)

        try:
            for split, text in chunks(segments, block_bytes, lambda s, raw: (on_read(s, raw), bar.update(len(raw)))):
                in_flight.append((split, pool.apply_async(encode_chunk, (text,))))
                write_until(2 * workers)  # a bounded queue: the corpus is read only as fast as it is tokenized
            write_until(0)
        except BaseException:
            # Pool.terminate() with large chunks still being handed out can hang in CPython's Pool: on any error
            # (bad bytes, Ctrl-C) the chunks already sent are let finish, and the pool shuts down as normal
            for _, result in in_flight:
                result.wait()
            raise
        finally:
            pool.close()
            pool.join()
    return counts


def prepare(paths, out, tokenizer="char", vocab_size=None, globs=DEFAULT_GLOBS, workers=None, overwrite=False):
    """Tokenize the files that `paths` name into `out`; returns its meta.json as a dict."""
    started, out, block_bytes = time.perf_counter(), Path(out), BLOCK_BYTES
    if (out / PREPARED_META).exists() and not overwrite:
        raise SystemExit(f"--out {out} already holds a prepared corpus; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    files = find_inputs(paths, globs)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if not total:
        raise SystemExit(f"--data: the {len(files)} input file(s) are empty")
    cut = split_at(total, byte_reader(files, sizes))
    segments = plan_segments(files, sizes, cut)
    tok = learn_tokenizer(tokenizer, vocab_size, segments, block_bytes)

    corpus_hash, file_hashes = hashlib.sha256(), {p: hashlib.sha256() for p in files}

    def on_read(segment, raw):
        corpus_hash.update(raw)
        file_hashes[segment.path].update(raw)

    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
            with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file:
                files_out = {"train": train_file, "val": val_file}
                counts = tokenize(tok, segments, total, files_out, workers or os.cpu_count(), block_bytes, on_read)
            # the old description goes before the new token files replace the old ones: never a mismatched pair
            (out / PREPARED_META).unlink(missing_ok=True)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    meta = {
        "format": 1,
        "dtype": token_dtype(tok.vocab_size),
        "tokenizer": tok.to_dict(),
        "inputs": [{"path": str(p), "bytes": n, "sha256": file_hashes[p].hexdigest()} for p, n in zip(files, sizes)],
        "sha256": corpus_hash.hexdigest(),  # of the concatenation: one file's own sha256, as --data FILE records
        "splits": {
            "train": {"tokens": counts["train"], "bytes": cut},
            "val": {"tokens": counts["val"], "bytes": total - cut},
        },
    }
    atomic_write_bytes(out / PREPARED_META, json.dumps(meta, indent=1).encode())  # last: the folder is now whole
    seconds = time.perf_counter() - started
    print(
        f"prepared {len(files)} files, {total:,} bytes ({tok.kind}, {tok.vocab_size} tokens, {meta['dtype']}): "
        f"{counts['train']:,} train + {counts['val']:,} val tokens at {sum(counts.values()) / seconds:,.0f} "
        f"tokens/s into {out}"
    )
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m train.prepare",
        description="Tokenize files and folders once into token files that python -m train --data DIR reads from disk.",
    )
    p.add_argument("--data", nargs="+", required=True, help="files, or folders searched recursively by --glob")
    p.add_argument("--out", required=True, help="folder for train.bin, val.bin and meta.json")
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char (default), byte, bpe (learned from the training split), or a checkpoint (run folder or "
        ".safetensors) whose tokenizer to reuse, to fine-tune it on this corpus",
    )
    p.add_argument("--vocab-size", type=int, help=f"tokens in a BPE vocabulary (default {DEFAULT_BPE_VOCAB})")
    p.add_argument(
        "--glob", action="append", help="file name pattern inside folders; repeatable (default: *.txt and *.md)"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already prepared in --out")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "bpe":
        p.error("--vocab-size is for --tokenizer bpe only")
    if args.vocab_size is not None and args.vocab_size < 256:
        p.error(f"--vocab-size must be at least 256 (a byte-level BPE holds every byte), not {args.vocab_size}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, not {args.workers}")
    for pattern in args.glob or ():
        if not pattern or Path(pattern).is_absolute():
            p.error(f"--glob {pattern!r}: give a file name pattern such as '*.py', matched inside the --data folders")
    try:
        globs = args.glob or DEFAULT_GLOBS
        prepare(args.data, args.out, args.tokenizer, args.vocab_size, globs, args.workers, args.overwrite)
    except KeyboardInterrupt:  # what was written is gone (a folder it made) or untouched (one that held a corpus)
        print("python -m train.prepare: interrupted; --out is as it was", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # an unreadable input, a read-only or full --out
        raise SystemExit(f"python -m train.prepare: {e.filename or args.out}: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
