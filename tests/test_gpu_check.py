"""The GPU check (scripts/gpu-check.sh, benchmarks/gpu.py): here on a CPU, its quick mode writes every row
and the script refuses a machine without CUDA in one line; on a GPU, the tests marked `cuda` below are the
ones the script runs (the engine on CUDA against full forwards, and its compiled decode step)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_gpt

from benchmarks.gpu import BUNDLED, VARIANTS, val_loss
from model import load_checkpoint
from model.engine import Engine, Finished, Request, Token
from model.sampling import SamplingParams, sample_next_token

SCRIPT = REPO / "scripts" / "gpu-check.sh"
MODELS = ["bundled", "6L-384", "gpt2-small"]
# characters of the bundled GPT's vocabulary (Tiny Shakespeare's), so that its tokenizer encodes them
LINE = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east!\n"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
        if VARIANTS[r["variant"]][1]:  # compiled: --quick leaves it out
            assert "--quick" in r["skipped"]
        else:
            assert r["batch1_tok_s"] > 0 and r["batch32_tok_s"] > 0, r
            assert len(r["tokens"]) == r["new_tokens"]
        assert f"| {r['label']} | {r['variant']} |" in table
    http = results["http"]
    assert http["startup_s"] > 0 and [s["clients"] for s in http["streams"]] == [1, 4]
    assert all(s["aggregate_tok_s"] > 0 and s["ttft_p99_ms"] > 0 for s in http["streams"])
    loss = results["val_loss"]
    assert math.isfinite(loss["float32"]) and abs(loss["delta"]) < 0.05  # bfloat16 weights: about the same loss
    assert "## Over HTTP" in table and "| bfloat16 |" in table


@pytest.mark.slow
def test_gpu_benchmark_past_its_budget_skips_every_row_and_says_so(tmp_path):
    results, table = run_gpu_benchmark(tmp_path, "--budget-s", "0")
    assert all("time budget" in r["skipped"] or "--quick" in r["skipped"] for r in results["engine"])
    assert "time budget" in results["http"]["skipped"] and "time budget" in results["val_loss"]["skipped"]
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
