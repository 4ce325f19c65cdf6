"""The soak tool as CI runs it: a short, light run of a real default server (its background compile, then a few
seconds of load), into a copy of docs/reliability.md. Counts only: no assertion on speed or memory growth."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(1500)]


def test_a_short_soak_serves_every_route_without_errors(tmp_path):
    page, out = tmp_path / "reliability.md", tmp_path / "soak.json"
    shutil.copy(REPO / "docs" / "reliability.md", page)
    command = [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.5", "--streams", "4", "--seed", "1"]
    run = subprocess.run(
        [*command, "--out", str(out), "--page", str(page)], cwd=REPO, capture_output=True, text=True, timeout=1400
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    f = results["figures"]
    assert f["errors"] == 0, f["error_samples"]
    assert results["exit_code"] == 0 and results["server_5xx"] == 0
    assert all(f["served"].get(r, 0) > 0 for r in ("/generate", "/v1/completions", "/v1/chat/completions"))
    assert f["served"].get("scoring", 0) > 0
    assert sum(f["cut"].values()) > 0
    assert len(f["memory_samples"]) >= 2 and f["memory"]["end"][1] > 0
    text = page.read_text()
    section = text.split("<!-- soak:start -->")[1].split("<!-- soak:end -->")[0]
    assert "| requests served |" in section and "| errors | 0 " in section and "TTFT p99" in section
    # the JSON alone makes the same table again
    subprocess.run([*command[:3], "--report-only", "--out", str(out), "--page", str(page)], cwd=REPO, check=True)
    assert page.read_text() == text
