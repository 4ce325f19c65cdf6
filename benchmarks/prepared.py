"""Training from a prepared corpus larger than memory: resident memory, and tokens/s against training
from memory.

    python -m benchmarks.prepared [--size-mb 1024] [--rounds 3] [--work DIR] [--quick]

Builds a corpus from this Python's standard library source, repeated to --size-mb and split into
files of about 100 MB (in a temporary folder, never committed), prepares it with a byte-level BPE
(`python -m train.prepare`), then trains the same GPT (the cpu preset) from it and from a 10 MB text
file held in memory, interleaved, several rounds. Each training run is a separate process whose
peak resident memory (VmHWM) is read from /proc. Writes docs/bench-prepared.{json,md}.
"""

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results

REPO = Path(__file__).resolve().parent.parent
VOCAB = "2048"
FILE_MB = 100
SMALL_MB = 10


def stdlib_text():
    """Every .py file of the standard library (not its tests), sorted: a second real corpus, tens of MB."""
    root = Path(sysconfig.get_path("stdlib"))
    parts = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0] or "site-packages" in path.parts:
            continue
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return "".join(parts).encode("utf-8")


def write_corpus(folder, size_mb):
    """Files of FILE_MB each, the stdlib repeated, to size_mb in all; and a SMALL_MB file beside them."""
    text = stdlib_text()
    folder.mkdir(parents=True)
    written, i = 0, 0
    while written < size_mb * 2**20:
        n = min(FILE_MB, size_mb - written // 2**20) * 2**20
        with open(folder / f"part-{i:03d}.txt", "wb") as f:
            left = n
            while left > 0:
                piece = text[: min(left, len(text))]
                cut = piece.rfind(b"\n") + 1 or len(piece)  # whole lines, so every file is valid UTF-8
                f.write(piece[:cut])
                left -= cut
        written += n
        i += 1
    small = folder.parent / "small.txt"
    small.write_bytes(text[: SMALL_MB * 2**20][: text[: SMALL_MB * 2**20].rfind(b"\n") + 1])
    return small


def run_measured(cmd):
    """Run `cmd`; return (seconds, peak resident MB of the process, stdout)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def watch():  # VmHWM is the process's own high-water mark; poll until it exits
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM"))
                peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed with {proc.returncode}")
    return time.perf_counter() - t, peak[0], out


def train_rate(data, out, iters, extra=()):
    """(median tokens/s, peak resident MB) of a cpu-preset training run on `data`."""
    cmd = [sys.executable, "-m", "train", "--data", data, "--out", out, "--preset", "cpu", "--overwrite"]
    cmd += [
        "--max-iters",
        str(iters),
        "--eval-interval",
        str(iters),
        "--eval-iters",
        "5",
        "--log-interval",
        "1",
        *extra,
    ]
    _, peak, _ = run_measured(cmd)
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][2:]  # the first steps warm up
    return statistics.median(rates), peak


def data_path_rate(prepared, blocks=8, steps=40):
    """The data path alone, in this one process: one cpu-preset GPT trained in alternating blocks of `steps`
    steps, on batches from the prepared training file and from its first 5M tokens held in memory (the
    same model and machine moment for both, so that process-to-process noise drops out). Median tokens/s
    of each, {"memory": ..., "prepared": ...}."""
    import torch

    from model import GPT
    from train.config import PRESETS
    from train.data import get_batch, load_prepared
    from train.loop import make_autocast

    cpu = PRESETS["cpu"]
    corpus = load_prepared(prepared)
    on_disk = corpus.splits["train"]
    sources = {"memory": on_disk[:5_000_000], "prepared": on_disk}
    torch.manual_seed(0)
    model = GPT(
        corpus.tokenizer.vocab_size, cpu["context_size"], cpu["hidden_size"], cpu["n_layer"], cpu["n_head"], 0.0
    )
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    autocast = make_autocast("auto", "cpu")
    generators = {name: torch.Generator().manual_seed(1) for name in sources}
    rates = {name: [] for name in sources}
    for block in range(blocks + 1):
        for name in sorted(sources, reverse=block % 2 == 1):
            start = time.perf_counter()
            for _ in range(steps):
                x, y = get_batch(sources[name], cpu["batch_size"], cpu["context_size"], generators[name])
                with autocast:
                    _, loss = model(x, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if block:  # the first block of each warms up
                rates[name].append(steps * x.numel() / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=400, help="training steps per run")
    ap.add_argument("--quick", action="store_true", help="a 12 MB corpus, one short round: a smoke test")
    ap.add_argument(
        "--work", help="a folder to build the corpus in and keep (reused when it holds one), not a temporary one"
    )
    args = ap.parse_args()
    if args.quick:
        args.size_mb, args.rounds, args.iters = 12, 1, 20
    with tempfile.TemporaryDirectory(prefix="quill-bench-prepared-") as tmp:
        tmp = Path(args.work or tmp)
        if args.work and (tmp / "prepared" / "meta.json").is_file():  # kept from an earlier run
            small, (prep_s, prep_peak, prep_out) = tmp / "small.txt", json.loads((tmp / "prepare.json").read_text())
        else:
            small = write_corpus(tmp / "corpus", args.size_mb)
            prep = [sys.executable, "-m", "train.prepare", "--data", tmp / "corpus", "--tokenizer", "bpe"]
            prep_s, prep_peak, prep_out = run_measured([*prep, "--vocab-size", VOCAB, "--out", tmp / "prepared"])
            (tmp / "prepare.json").write_text(json.dumps([prep_s, prep_peak, prep_out]))
        meta = json.loads((tmp / "prepared" / "meta.json").read_text())
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        runs = {"memory": [], "prepared": []}
        train = {
            "memory": lambda: train_rate(
                small, tmp / "run-memory", args.iters, ["--tokenizer", "bpe", "--vocab-size", VOCAB]
            ),
            "prepared": lambda: train_rate(tmp / "prepared", tmp / "run-prepared", args.iters),
        }
        for i in range(args.rounds):  # interleaved, each first in every other round: the drift falls on both alike
            for name in sorted(train, reverse=i % 2 == 1):
                runs[name].append(train[name]())
        in_process = data_path_rate(tmp / "prepared", blocks=2 if args.quick else 8)
    results = {
        "corpus_mb": args.size_mb,
        "corpus_tokens": tokens,
        "prepare_seconds": prep_s,
        "prepare_peak_mb": prep_peak,
        "prepare_summary": prep_out.strip().splitlines()[-1:],
        "in_process_tokens_per_s": in_process,
        "rounds": args.rounds,
        "iters": args.iters,
        **{
            f"{name}_{key}": [r[i] for r in rs]
            for name, rs in runs.items()
            for i, key in enumerate(["tokens_per_s", "peak_mb"])
        },
    }
    med = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    peak = {name: max(r[1] for r in rs) for name, rs in runs.items()}
    rows = [
        [f"{SMALL_MB} MB text file, in memory", f"{med['memory']:,.0f}", "1.00", f"{peak['memory']:,.0f}"],
        [
            f"{args.size_mb:,} MB prepared folder ({tokens / 1e6:,.0f}M tokens), read from disk a batch ahead",
            f"{med['prepared']:,.0f}",
            f"{med['prepared'] / med['memory']:.3f}",
            f"{peak['prepared']:,.0f}",
        ],
    ]
    table = markdown_table(["training from", "tokens/s (median)", "ratio", "peak resident MB"], rows)
    table += (
        f"\n\nPreparing it (`python -m train.prepare`, BPE {VOCAB}, every core): {prep_s / 60:.1f} min, "
        f"peak resident {prep_peak:,.0f} MB in the parent process. {args.rounds} interleaved rounds of "
        f"{args.iters} steps each (cpu preset).\n\nThe data path alone, in one process (`data_path_rate`: one "
        f"model trained in alternating blocks of 40 steps, 8 each, on batches from the prepared file and from "
        f"5M of its tokens in memory): {in_process['prepared']:,.0f} against {in_process['memory']:,.0f} tokens/s, "
        f"{in_process['prepared'] / in_process['memory']:.3f}x."
    )
    write_results("prepared-quick" if args.quick else "prepared", results, table)


if __name__ == "__main__":
    main()
