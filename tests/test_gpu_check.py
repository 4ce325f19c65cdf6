"""The GPU check (scripts/gpu-check.sh, benchmarks/gpu.py): here on a CPU, its plan fits a borrowed GPU's
time, its dry run shows the default's steps with their expected times on a GPU, its quick mode writes every row
of the default, and the script refuses a machine without CUDA in one line; on a GPU, the tests marked `cuda`
below are among those the script runs (the engine on CUDA against full forwards, and its compiled decode step)."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, tiny_gpt

from benchmarks.gpu import BUNDLED, DEFAULT_MODELS, EXPECTED_S, VARIANTS, plan, val_loss
from model import load_checkpoint
from model.engine import Engine, Finished, Request, Token
from model.sampling import SamplingParams, sample_next_token

SCRIPT = REPO / "scripts" / "gpu-check.sh"
MODELS = ["bundled", "6L-384", "gpt2-small"]
# characters of the bundled GPT's vocabulary (Tiny Shakespeare's), so that its tokenizer encodes them
LINE = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east!\n"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def script_settings():
    """gpu-check.sh's budget for the benchmark (default, --full) and its limit for the CUDA tests, in seconds."""
    text = SCRIPT.read_text()
    ((default, tests),) = re.findall(r"budget_s=(\d+) tests_limit_s=(\d+)", text)
    (full,) = re.findall(r"--full\) full=\(--full\) budget_s=(\d+)", text)
    return int(default), int(full), int(tests)


def test_the_default_plan_is_the_most_telling_rows_and_fits_a_borrowed_gpus_time():
    jobs = plan(full=False)
    assert [j[:3] for j in jobs] == [
        ("engine", "bundled", "bfloat16 eager"),
        ("engine", "bundled", "float32 eager"),
        ("engine", "gpt2-small", "bfloat16 eager"),
        ("engine", "gpt2-small", "float32 eager"),
        ("http", None, "bfloat16 eager"),
        ("val loss", None, None),
    ]
    budget, _, tests_limit = script_settings()
    bench = sum(j[3] for j in jobs)
    assert bench <= budget  # nothing of the default is skipped if the estimates hold
    assert EXPECTED_S["setup"] + EXPECTED_S["tests"] + bench <= 4 * 60  # expected: about 3 minutes
    # at worst (every limit reached, and the benchmark's 30 s of grace): 5 minutes, so a second try fits in 15
    assert EXPECTED_S["setup"] + tests_limit + budget + 30 <= 5 * 60


def test_full_adds_the_long_rows_after_the_defaults_and_fits_one_call_of_the_device_tool():
    jobs, default = plan(full=True), plan(full=False)
    assert jobs[: len(default)] == default
    engine = {(m, v) for kind, m, v, _ in jobs if kind == "engine"}
    assert engine == {(m, v) for m in (*DEFAULT_MODELS, "6L-384") for v in VARIANTS}
    assert ("http", None, "bfloat16 compiled") in [j[:3] for j in jobs]
    _, budget, tests_limit = script_settings()
    assert EXPECTED_S["setup"] + tests_limit + budget + 30 <= 600  # the device tool's limit for one command


@pytest.mark.slow
@pytest.mark.server
def test_gpu_check_dry_run_on_a_cpu_shows_the_defaults_steps_with_their_expected_gpu_times(tmp_path):
    before = {p.name: p.stat().st_mtime for p in (REPO / "docs").iterdir()}
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    took = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    steps = [text.index(f"] {n}. ") for n in (1, 2, 3)]
    assert steps == sorted(steps)
    assert f"torch {torch.__version__}" in text and "CUDA" in text  # the versions, first
    planned = re.findall(r"^ +\d+\. (.+): (\d+) s$", text, re.M)
    assert [what for what, _ in planned[:2]] == ["setup: wheels, versions, this plan", "CUDA tests"]
    total = int(re.search(r"expected in all: (\d+) s", text)[1])
    assert total == sum(int(s) for _, s in planned) <= 4 * 60
    assert "::test_cuda_compiled_decode_step_equals_full_forward_greedy" in text  # listed, not run
    ran = re.findall(r"^\[\d+ s\] (.+): [\d.]+ s \(expected (\d+) s on a GPU\)$", text, re.M)
    assert [(f"benchmark: {what}", s) for what, s in ran] == planned[2:]  # each step of the plan, in its order
    assert "compiled" not in " ".join(what for what, _ in planned)
    assert {p.name: p.stat().st_mtime for p in (REPO / "docs").iterdir()} == before  # no results written there
    assert took < 5 * 60


def run_gpu_benchmark(tmp_path, *args):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out-dir", str(tmp_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # two threads on two busy cores ran it 7x slower
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((tmp_path / "bench-gpu.json").read_text()), (tmp_path / "benchmarks-gpu.md").read_text()


@pytest.mark.slow
@pytest.mark.server
def test_gpu_benchmark_quick_on_a_cpu_measures_every_row_and_writes_the_table(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LINE * 200)
    results, table = run_gpu_benchmark(tmp_path, "--corpus", str(corpus))
    rows = results["engine"]
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in MODELS for v in VARIANTS]
    for r in rows:
        if VARIANTS[r["variant"]][1] or r["model"] not in DEFAULT_MODELS:  # compiled, 6L: --full only
            assert r["skipped"] == "--full only"
        else:
            assert r["batch1_tok_s"] > 0 and r["batch32_tok_s"] > 0, r
            assert len(r["tokens"]) == r["new_tokens"]
        assert f"| {r['label']} | {r['variant']} |" in table
    assert results["http_compiled"] == {"skipped": "--full only"}
    http = results["http"]
    assert http["startup_s"] > 0 and [s["clients"] for s in http["streams"]] == [1, 4]
    assert all(s["aggregate_tok_s"] > 0 and s["ttft_p99_ms"] > 0 for s in http["streams"])
    loss = results["val_loss"]
    assert math.isfinite(loss["float32"]) and abs(loss["delta"]) < 0.05  # bfloat16 weights: about the same loss
    assert "## Over HTTP" in table and "| bfloat16 |" in table
    assert f"torch {torch.__version__} (the image pins " in table


@pytest.mark.slow
def test_gpu_benchmark_past_its_budget_skips_every_row_and_says_so(tmp_path):
    results, table = run_gpu_benchmark(tmp_path, "--budget-s", "0", "--full")
    assert all("time budget" in r["skipped"] or "--quick" in r["skipped"] for r in results["engine"])
    assert "time budget" in results["http"]["skipped"] and "time budget" in results["val_loss"]["skipped"]
    assert results["http_compiled"]["skipped"] == "--quick: not compiled"
    assert table.count("time budget") == 2 * len(MODELS) + 2


def test_gpu_benchmark_without_the_corpus_skips_the_val_loss_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere.txt"
    assert val_loss(missing, "cpu", quick=True) == {"skipped": f"no corpus at {missing} (pass --corpus)"}


@pytest.mark.parametrize("script", ["gpu-check.sh", "gpu-wheels.sh"])
def test_gpu_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_cuda_exits_1_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert out.stdout == "" and out.stderr.count("\n") == 1
    assert "sees no CUDA GPU" in out.stderr


# On a GPU (scripts/gpu-check.sh runs these): the engine's arithmetic and sampling on CUDA.


def full_forward_greedy(model, prompt, n):
    """Argmax decoding by full forwards (no cache): the reference, within the context."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def run_together(engine, prompts, n, **sampling):
    """Each prompt's tokens, the requests submitted together so that they share every step."""
    events = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=n, **sampling), events[i].append))
    while not all(e and isinstance(e[-1], Finished) for e in events):
        engine.step()
    return [[e.id for e in evs if isinstance(e, Token)] for evs in events]


@pytest.mark.cuda
@needs_cuda
def test_cuda_engine_equals_full_forwards_and_gpt_generate_alone_and_batched():
    model = tiny_gpt(40, context_size=32).double().cuda()  # double: the comparison is of logic, not rounding
    prompts = [[1, 2, 3, 4], [7, 8], [9] * 10]
    engine = Engine(model, max_batch=4)
    assert run_together(engine, prompts, 20, temperature=0.0) == [full_forward_greedy(model, p, 20) for p in prompts]
    ids, params = list(prompts[0]), SamplingParams(seed=7)
    for place in range(28):  # sampled: full forwards, each token drawn at its place (model/sampling.py)
        ids.append(sample_next_token(model(torch.tensor([ids[-32:]], device="cuda"))[0][0, -1], params, place))
    assert engine.generate(prompts[0], 28, seed=7) == ids[4:]


@pytest.mark.cuda
@needs_cuda
def test_cuda_engine_same_seed_same_tokens_alone_or_batched():
    model = tiny_gpt(40, context_size=32).cuda()  # float32, as served
    engine = Engine(model, max_batch=4)
    prompts = [[1, 2, 3], [5] * 6, [7, 8]]
    alone = engine.generate(prompts[0], 60, seed=11)  # past the context: the window slides
    assert run_together(engine, prompts, 60, seed=11)[0] == alone


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_decode_step_equals_full_forward_greedy():
    model, tokenizer, _ = load_checkpoint(BUNDLED, device="cuda")  # trained: its greedy choices are clear
    engine = Engine(model, max_batch=2, compiled=True)
    engine.warm_up()
    assert engine.cache.step is not None, "compiling the decode step failed (see the log)"
    prompts = [tokenizer.encode("ROMEO:\n"), tokenizer.encode("JULIET:\nO Romeo,")]
    expected = [full_forward_greedy(model, p, 40) for p in prompts]
    assert run_together(engine, prompts, 40, temperature=0.0) == expected  # bucket 2
    assert engine.generate(prompts[0], 40, temperature=0.0) == expected[0]  # bucket 1
