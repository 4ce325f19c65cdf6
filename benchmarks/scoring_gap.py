"""How long a long prompt to score stops the other streams: their longest gap between two tokens while a
16,000-character text is scored (echo with logprobs, as lm-evaluation-harness asks), in this tree and in an
earlier commit (by default the one before prompt scoring was split into windows between decode steps).

    python -m benchmarks.scoring_gap [--base REF] [--rounds N] [--quick]

Each round runs both trees, one after the other in fresh processes (interleaved, so a change in the machine's
load touches both alike): the bundled GPT in the engine (1 torch thread, as the server gives it), STREAMS
streams generating, then the scoring submitted. Figures are medians over the rounds. Writes
docs/bench-scoring-gap.{json,md}.
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CHECKPOINT = ROOT / "checkpoints" / "shakespeare-gpt"
BASE = "6e66e7f"  # the last commit that scored a prompt in one go
STREAMS, CHARS = 8, 16_000


def measure(chars):
    """In the tree on sys.path: the streams' longest and median gaps while `chars` characters are scored."""
    import torch

    from model import load_checkpoint
    from model.engine import Engine, Finished, Request
    from model.sampling import SamplingParams

    torch.set_num_threads(1)
    model, tokenizer, _ = load_checkpoint(CHECKPOINT / "model.safetensors")
    engine = Engine(model, max_batch=32)
    engine.start()
    engine.generate([0], 2)  # warm up
    arrivals = [[] for _ in range(STREAMS)]
    scored = threading.Event()
    for i in range(STREAMS):
        params = SamplingParams(max_new_tokens=100_000, seed=i)
        engine.submit(Request([1, 2, 3], params, lambda event, i=i: arrivals[i].append(time.perf_counter())))
    while min(len(a) for a in arrivals) < 50:
        time.sleep(0.01)
    text = CORPUS.read_text(encoding="utf-8")[:chars]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=5)
    start = time.perf_counter()
    engine.submit(Request(tokenizer.encode(text), params, lambda e: isinstance(e, Finished) and scored.set()))
    scored.wait()
    end = time.perf_counter()
    time.sleep(0.2)  # a few tokens after it, so the gap that spans its end is counted
    engine.stop()
    during, other = [], []
    for times in arrivals:
        for a, b in zip(times, times[1:]):
            (during if b > start and a < end else other).append(b - a)
    return {
        "scoring_s": end - start,
        "longest_gap_ms": max(during) * 1e3,
        "median_gap_ms": statistics.median(other) * 1e3,
    }


def run_in(tree, chars):
    """measure() in a fresh process that imports Quill from `tree`."""
    run = f"import runpy, sys; sys.argv = ['scoring_gap', '--measure', '{chars}']; runpy.run_path({__file__!r}, "
    run += "run_name='__main__')"  # `python -c` puts the tree (its working folder) first on sys.path
    out = subprocess.run([sys.executable, "-c", run], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=BASE, help=f"the earlier commit to compare with (default {BASE})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one round of a 2,000-character text")
    ap.add_argument("--measure", type=int, metavar="CHARS", help=argparse.SUPPRESS)  # one tree's run (run_in)
    args = ap.parse_args()
    if args.measure:
        return print(json.dumps(measure(args.measure)))
    rounds, chars = (1, 2000) if args.quick else (args.rounds, CHARS)
    base = ROOT / ".tools" / f"scoring-gap-{args.base}"
    if not base.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True)
    trees = {f"before ({args.base})": base, "after (this tree)": ROOT}
    runs = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            runs[name].append(run_in(tree, chars))
            print(name, runs[name][-1], flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    rows = [
        [name, f"{m['scoring_s']:.2f}", f"{m['longest_gap_ms']:.0f}", f"{m['median_gap_ms']:.1f}"]
        for name, m in med.items()
    ]
    header = ["engine", "scoring s", "other streams' longest gap, ms", "their median gap, ms"]
    table = markdown_table(header, rows) + (
        f"\n\n{STREAMS} streams of the bundled GPT generating while {chars:,} characters are scored (echo, "
        f"logprobs 5); medians of {rounds} interleaved rounds. `python -m benchmarks.scoring_gap`."
    )
    if not args.quick:
        write_results("scoring-gap", {"runs": runs, "medians": med, "chars": chars, "streams": STREAMS}, table)
    else:
        print(table)


if __name__ == "__main__":
    main()
