"""Shared by the benchmark scripts: the machine's description, medians, result files and generated blocks."""

import json
import os
import platform
import statistics
import textwrap
import time
from pathlib import Path

import torch

# tests point this elsewhere so a smoke run never overwrites the committed results
DOCS = Path(os.environ.get("QUILL_BENCH_DOCS", Path(__file__).resolve().parent.parent / "docs"))


def machine():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def median_time(fn, repeats):
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def write_results(name, results, table):
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"bench-{name}.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    (DOCS / f"bench-{name}.md").write_text(table + "\n")
    print(table)


def write_between_markers(path, name, paragraph):
    """Put `paragraph` (wrapped) between the lines `<!-- name:start -->` and `<!-- name:end -->` of the file at
    `path`, so that a page quotes generated figures beside its own words."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = path.read_text()
    if page.count(start) != 1 or page.count(end) != 1 or page.index(start) > page.index(end):
        raise SystemExit(f"{path}: no single {start} ... {end} pair to write between")
    head, rest = page.split(start)
    text = textwrap.fill(paragraph.strip(), 110, break_long_words=False, break_on_hyphens=False)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end)[1]}")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
