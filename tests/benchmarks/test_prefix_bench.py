import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from benchmarks import prefix


def test_report_from_synthetic_results():
    raw = {
        "machine": {"cpu": "test cpu", "cores": 2, "date": "2026-12-06"},
        "results": {
            "command": "python -m benchmarks.prefix --quick",
            "load_start": "0.10",
            "load_end": "0.20",
            "runs": [
                {
                    "model": "bundled",
                    "mode": "greedy",
                    "scenario": "cold",
                    "ttft_s": {"Quill": [0.01, 0.02], prefix.BASELINE: [0.02, 0.04]},
                    "mismatches": {"Quill": 0},
                }
            ],
        },
    }
    page = prefix.report(raw)
    assert "| bundled | greedy | cold | Quill | 10.0 | 20.0 | 0.50 | 0.50 | 0 |" in page
    assert "python -m benchmarks.prefix --quick" in page


@pytest.mark.slow
@pytest.mark.server
def test_a_quick_run_without_llama_cpp_measures_both_quill_servers_with_the_same_text(tmp_path):
    """The benchmark as a user runs it (--quick: the bundled GPT, one round), Quill's servers only: every scenario
    and mode has a time to first token for each of the 32 requests, on each system, and reuse changed no text."""
    env = {**os.environ, "QUILL_BENCH_DOCS": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.prefix", "--quick", "--no-llama"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    raw = json.loads((tmp_path / "bench-prefix.json").read_text())
    runs = raw["results"]["runs"]
    assert {(r["mode"], r["scenario"]) for r in runs} == {(m, s) for m in prefix.MODES for s in ("cold", "warm")}
    for r in runs:
        assert set(r["ttft_s"]) == set(prefix.QUILL_SYSTEMS)
        assert all(len(times) == prefix.CLIENTS for times in r["ttft_s"].values())
        assert r["mismatches"] == {"Quill": 0}
    assert raw["results"]["failed"] == 0
    assert "| Quill, QUILL_PREFIX_CACHE=0 |" in (tmp_path / "benchmarks-prefix.md").read_text()
