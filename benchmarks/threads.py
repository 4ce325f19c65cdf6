"""Training speed with 2 and 1 torch threads, alone and beside another busy process.

    python -m benchmarks.threads [--quick] [--data PATH] [--iters N] [--repeats N]

Each trial is a real `python -m train --preset cpu --threads N` run of a fixed number of
iterations. Its tokens/s is the tokens trained over the training time its log reports
(evaluations and start-up excluded), after the first few steps. The busy process is a
second Python spinning on one core, bounded in time and killed when the trial ends. Trials
are interleaved (each repetition runs every setting once, so a change in the machine's load
touches all of them alike) and each figure is the median over the repetitions.

torch's intra-op threads split every operation and then wait for each other; when another
process holds one of two cores, the thread that shares it arrives late at every join.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SETTINGS = [(2, False), (1, False), (2, True), (1, True)]  # (threads, beside a busy process)
HOG_SECONDS = 900  # the busy process ends by itself even if this script is killed
HOG = f"import time\nend = time.monotonic() + {HOG_SECONDS}\nwhile time.monotonic() < end: pass\n"


def trainer_env():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(ROOT)}


def tokens_per_s(run_dir, skip):
    """Tokens over training seconds between the log's train row `skip` and its last one."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    first, last = steps[skip], steps[-1]
    return (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"])


def trial(data, out, threads, busy, iters, skip):
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--data",
        data,
        "--out",
        str(out),
        "--preset",
        "cpu",
        "--max-iters",
        str(iters),
        "--eval-interval",
        str(iters),
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
        "--threads",
        str(threads),
    ]
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=3600)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    if proc.returncode:
        raise SystemExit(f"the trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return tokens_per_s(out, skip)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short trial of each setting (a smoke test)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--iters", type=int, default=None, help="training steps per trial (default 100; quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="trials per setting (default 3; quick: 1)")
    args = ap.parse_args()
    iters = args.iters or (8 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 3)
    skip = min(5, iters // 4)  # the first steps warm up the allocator and the thread pool
    load_before = os.getloadavg()
    samples = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for threads, busy in SETTINGS:
                out = Path(tmp) / f"t{threads}-{'busy' if busy else 'alone'}-{rep}"
                samples[threads, busy].append(trial(args.data, out, threads, busy, iters, skip))
                print(
                    f"repeat {rep + 1}/{repeats}, --threads {threads}, {'beside a busy process' if busy else 'alone'}:"
                    f" {samples[threads, busy][-1]:.0f} tokens/s",
                    flush=True,
                )
    rows = [
        {"threads": t, "busy_process": b, "tokens_per_s": statistics.median(samples[t, b]), "samples": samples[t, b]}
        for t, b in SETTINGS
    ]
    med = {(r["threads"], r["busy_process"]): r["tokens_per_s"] for r in rows}
    load_after = os.getloadavg()
    results = {
        "iters": iters,
        "repeats": repeats,
        "skipped_steps": skip,
        "runs": rows,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    table = markdown_table(
        ["--threads", "beside a busy process", f"tokens/s (median of {repeats})", "each trial"],
        [
            [
                r["threads"],
                "yes" if r["busy_process"] else "no",
                f"{r['tokens_per_s']:.0f}",
                ", ".join(f"{x:.0f}" for x in r["samples"]),
            ]
            for r in rows
        ],
    )
    table += (
        f"\n\n`--preset cpu` GPT, {iters} steps a trial, steps {skip + 1}-{iters} timed. Beside a busy "
        f"process, --threads 2 ran at {med[2, True] / med[2, False]:.2f}x its speed alone and --threads 1 "
        f"at {med[1, True] / med[1, False]:.2f}x; there --threads 1 was {med[1, True] / med[2, True]:.1f}x "
        f"faster than 2. Load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}."
    )
    write_results("threads" + ("-quick" if args.quick else ""), results, table)


if __name__ == "__main__":
    main()
