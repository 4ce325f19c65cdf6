"""Run every benchmark and rebuild docs/benchmarks.md from their results.

    python -m benchmarks [--quick]      (make bench)

The narrative (what was changed and what it bought) lives in docs/benchmarks-notes.md and
is copied in; the tables and the machine's description come from this run.
"""

import argparse
import json
import subprocess
import sys

from benchmarks.common import DOCS, machine

STEPS = ["decode", "http", "train"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test every script")
    ap.add_argument("--report-only", action="store_true", help="rebuild docs/benchmarks.md from the last results")
    args = ap.parse_args()
    for step in [] if args.report_only else STEPS:
        print(f"== benchmarks.{step}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{step}", *(["--quick"] if args.quick else [])], check=True)
    if args.quick:
        return
    m = json.loads((DOCS / "bench-train.json").read_text())["machine"] if args.report_only else machine()
    parts = [
        "# Benchmarks",
        "",
        f"Measured on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}. "
        "Regenerate with `make bench` (about 10 minutes). Timings are medians; ratios come from one run.",
        "",
    ]
    titles = {
        "decode": "Decode at batch 1: engine vs GPT.generate, and the matvec floor",
        "http": "Batching over HTTP (real uvicorn server, loopback, httpx streaming clients)",
        "train": "Training speed and MFU",
    }
    for step in STEPS:
        parts += [f"## {titles[step]}", "", (DOCS / f"bench-{step}.md").read_text().strip(), ""]
        if step == "http":
            parts += ["![aggregate tokens/s and p99 latency against concurrency](bench-http.png)", ""]
    prepared = DOCS / "bench-prepared.md"  # its own run (python -m benchmarks.prepared, about 15 minutes)
    if prepared.exists():
        parts += [
            "## Training from a prepared corpus larger than memory",
            "",
            "`python -m benchmarks.prepared` (not part of `make bench`: it builds and tokenizes a 1 GB corpus).",
            "",
            prepared.read_text().strip(),
            "",
        ]
    notes = DOCS / "benchmarks-notes.md"
    if notes.exists():
        parts += [notes.read_text().strip(), ""]
    (DOCS / "benchmarks.md").write_text("\n".join(parts))
    print(json.dumps({"wrote": str(DOCS / "benchmarks.md")}))


if __name__ == "__main__":
    main()
