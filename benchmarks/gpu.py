"""Quill on a GPU: decode tokens/s of the Engine in process and of a real server over HTTP, in float32,
bfloat16, and bfloat16 with the compiled decode step; and the bundled GPT's val loss in each precision.

    python -m benchmarks.gpu [--device cuda] [--full] [--quick] [--out-dir DIR] [--corpus PATH] [--budget-s S]
    python -m benchmarks.gpu --plan [--full]     # this machine's versions and the plan, each job's expected time

scripts/gpu-check.sh runs it on the device machine, where a borrowed GPU has about 15 minutes in all: the
default measures what tells most in about 1.5 minutes (expected), the engine at batch 1 and 32 in bfloat16
and float32 (eager) on the bundled GPT and a random GPT of GPT-2 small's shape (12L/12H/768, ctx 1024, vocab
50257, tanh GELU), one eager server over HTTP and the val loss; --full adds a random 6L/384/ctx256 GPT and every
compiled row (the engines' and a server's), about 7 minutes more. Random models are fed token ids (speed
depends on the shape, not the weights or a tokenizer). Greedy decoding of a 16-token prompt; batch 1, and 32
requests submitted together (max_batch 32; their 32 prefills are in the time); medians of 3 after a warm-up,
the device synchronized before each clock reading. The compiled engines are built for the two batch sizes
measured (1 and 32); the compiled server builds all six (1, 2, 4, ..., 32) from a cold compile cache, and its
start-up to /ready is reported. The results are rewritten after each measurement, so a run cut short keeps what
it measured; past --budget-s the rest is skipped, and says so.
"""

import argparse
import asyncio
import copy
import gc
import json
import re
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import DOCS, machine, markdown_table, median_time
from benchmarks.http import ROOT, concurrent, free_port, start_server
from model import GPT, load_checkpoint
from model.device import pick_device, pick_dtype
from model.engine import Engine, Finished, Request
from model.sampling import SamplingParams
from train.data import full_loss, read_corpus, split_text

BUNDLED = ROOT / "checkpoints" / "shakespeare-gpt"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SERVER_LOG = Path(tempfile.gettempdir()) / "quill-bench-gpu-server.log"
PROMPT_TOKENS, BATCH, REPEATS = 16, 32, 3
VARIANTS = {  # name: (weights' dtype, compiled decode step)
    "float32 eager": (torch.float32, False),
    "bfloat16 eager": (torch.bfloat16, False),
    "bfloat16 compiled": (torch.bfloat16, True),
}
DEFAULT_MODELS = ("bundled", "gpt2-small")  # --full adds 6L-384
# Each step's expected seconds on an H100 or H200: estimates, not measurements (no run on a GPU yet; each result
# line prints the time taken beside them, for the next edit). A job is skipped when less than its estimate is
# left of the budget. Eager decoding is bound by kernel launches (some 60 a step for the bundled GPT's 4 layers,
# 180 for GPT-2 small's 12: a few ms a step), about 1,000 steps a row with the warm-ups; a server's start imports
# torch twice (it and its engine process) and initialises CUDA; compiling on CUDA is AOTInductor's C++ build
# and Triton's kernels, per batch size.
EXPECTED_S = {
    "setup": 15,  # scripts/gpu-check.sh: wheels, then this module's --plan (torch's import, the versions)
    "tests": 80,  # pytest -m cuda: the engine on CUDA, and the compiled decode step built for 2 batch sizes
    "eager": 10,
    "http": 40,  # eager: start-up, then 1 and 32 streams of 100 tokens, 3 times
    "val loss": 10,
    "compiled": 60,  # 2 batch sizes
    "compiled gpt2-small": 120,
    "http compiled": 180,  # 6 batch sizes compiled at start-up, from a cold cache
}


def model_specs(quick):
    """(key, label, build(device) -> float32 GPT, new tokens) per model; --quick shrinks the random ones."""

    def bundled(device):
        return load_checkpoint(BUNDLED, device=device)[0]

    def random(**shape):
        def build(device):
            torch.manual_seed(0)
            with torch.device(device):  # initialised where it runs: GPT-2 small's init is slow on a CPU
                return GPT(dropout=0.0, **shape).eval()

        return build

    tiny = dict(context_size=64, hidden_size=64, n_layer=2, n_head=2)
    six = tiny if quick else dict(context_size=256, hidden_size=384, n_layer=6, n_head=6)
    gpt2 = tiny if quick else dict(context_size=1024, hidden_size=768, n_layer=12, n_head=12)
    shrunk, n = (" (--quick: 2L/64/ctx64)", [8, 8, 8]) if quick else (", random", [96, 192, 128])
    return [
        ("bundled", "bundled GPT (4L/256, ctx 128)", bundled, n[0]),
        ("6L-384", "6L/384/ctx256" + shrunk, random(vocab_size=65, **six), n[1]),
        ("gpt2-small", "GPT-2 small's shape" + shrunk, random(vocab_size=50257, gelu="tanh", **gpt2), n[2]),
    ]


def plan(full):
    """The benchmark's jobs in the order run, the most telling first: (kind, model, variant, expected s). The
    engine rows of the bundled GPT and GPT-2 small's shape in bfloat16 and float32, one eager server, the val
    loss; --full then adds the compiled rows, the compiled server and the 6L/384 GPT's rows."""
    jobs = [("engine", m, v, EXPECTED_S["eager"]) for m in DEFAULT_MODELS for v in ("bfloat16 eager", "float32 eager")]
    jobs += [("http", None, "bfloat16 eager", EXPECTED_S["http"]), ("val loss", None, None, EXPECTED_S["val loss"])]
    if full:
        jobs += [
            ("engine", "bundled", "bfloat16 compiled", EXPECTED_S["compiled"]),
            ("http", None, "bfloat16 compiled", EXPECTED_S["http compiled"]),
            *[("engine", "6L-384", v, EXPECTED_S["compiled" if VARIANTS[v][1] else "eager"]) for v in VARIANTS],
            ("engine", "gpt2-small", "bfloat16 compiled", EXPECTED_S["compiled gpt2-small"]),
        ]
    return jobs


def job_name(kind, model, variant):
    if kind == "engine":
        return f"engine, {model}, {variant}, batch 1 and {BATCH}"
    return f"a server over HTTP, {variant}, 1 and {BATCH} streams" if kind == "http" else "the bundled GPT's val loss"


def show_plan(full, budget_s):
    """Print the run's steps, each with its expected time on a GPU, and their total."""
    steps = [("setup: wheels, versions, this plan", EXPECTED_S["setup"]), ("CUDA tests", EXPECTED_S["tests"])]
    jobs = [(f"benchmark: {job_name(*job[:3])}", job[3]) for job in plan(full)]
    print(f"gpu-check plan ({'--full' if full else 'default'}), each step's expected time on an H100/H200 (estimates):")
    for i, (what, seconds) in enumerate(steps + jobs, 1):
        print(f"  {i:2}. {what}: {seconds} s")
    bench = sum(seconds for _, seconds in jobs)
    total = bench + sum(seconds for _, seconds in steps)
    print(f"  expected in all: {total} s (about {total / 60:.1f} min); the benchmark {bench} s of its {budget_s:.0f}")


def versions(device):
    """torch's and CUDA's versions, the GPU, its compute capability and what QUILL_DTYPE=auto picks on it."""
    pinned = re.search(r"^ARG TORCH_REQUIREMENT=torch==(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    line = f"torch {torch.__version__} (the image pins {pinned[1] if pinned else '?'}), CUDA {torch.version.cuda}"
    if torch.device(device).type != "cuda":
        return f"{line}, no GPU used (device {device})"
    auto = str(pick_dtype("auto", device)).removeprefix("torch.")  # before torch initialises CUDA: NVML's answer
    major, minor = torch.cuda.get_device_capability(device)
    return f"{line}, {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, auto dtype {auto}"


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(engine, prompts, n):
    """Submit every prompt, then step the engine until all are done: one batch of len(prompts) rows."""
    finished = []

    def emit(event):
        if isinstance(event, Finished):
            finished.append(event)

    for prompt in prompts:
        engine.submit(Request(list(prompt), SamplingParams(max_new_tokens=n, temperature=0.0), emit))
    while len(finished) < len(prompts):
        engine.step()
    failed = [f.error for f in finished if f.reason != "length"]
    if failed:
        raise RuntimeError(failed[0])


def measure_engine(base, dtype, compiled, n, device, repeats):
    model = copy.deepcopy(base).to(dtype)  # cast once, as the server does at load
    engine = Engine(model, max_batch=BATCH, compiled=compiled, compile_folder=tempfile.mkdtemp())  # compiled anew
    if compiled:
        engine.cache.buckets = [1, BATCH]  # only the batch sizes measured: compiling costs time per bucket
    vocab = model.config.vocab_size
    prompts = [[(7 * i + 13 * j + 1) % vocab for j in range(PROMPT_TOKENS)] for i in range(BATCH)]
    start = time.perf_counter()
    engine.warm_up()  # compiles, when compiled
    synchronize(device)
    row = {"new_tokens": n, "warm_up_s": time.perf_counter() - start}
    if compiled and engine.cache.step is None:
        row["note"] = "compiling failed: decoded eagerly (see the log)"
    out = []

    def alone():
        out.append(engine.generate(prompts[0], n, temperature=0.0))
        synchronize(device)

    def together():
        run_batch(engine, prompts, n)
        synchronize(device)

    row.update(batch1_tok_s=n / median_time(alone, repeats), batch32_tok_s=BATCH * n / median_time(together, repeats))
    row["tokens"] = out[-1]  # greedy: the same every run
    return row


def float_loss(model):
    """The model as full_loss calls it, its cross-entropy taken in float32: a bfloat16 loss is rounded to
    steps of 0.008 near 1.5, coarser than the differences measured."""

    def run(x, y):
        logits, _ = model(x)
        return logits, F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    return run


def val_loss(corpus, device, quick):
    if not corpus.is_file():
        return {"skipped": f"no corpus at {corpus} (pass --corpus)"}
    model, tokenizer, _ = load_checkpoint(BUNDLED, device=device)
    text, sha = read_corpus(str(corpus))
    context = model.config.context_size
    val = torch.tensor(tokenizer.encode(split_text(text)[1]), dtype=torch.long)
    val = val[: 16 * context + 1] if quick else val
    result = {"corpus": str(corpus), "corpus_sha256": sha, "tokens": (len(val) - 1) // context * context}
    for name in ("float32", "bfloat16"):
        with torch.inference_mode():
            result[name] = full_loss(float_loss(model.to(getattr(torch, name))), val, context, device=device)
    result["delta"] = result["bfloat16"] - result["float32"]
    return result


def http(device, quick, compiled, ready_within):
    """A real server on the bundled GPT in bfloat16, eager or compiled from a cold compile cache; 1 and 32
    streams (--quick: 4) through benchmarks.http's clients, which sample at temperature 1."""
    streams, tokens, repeats = ([1, 4], 8, 1) if quick else ([1, BATCH], 100, REPEATS)
    env = {"QUILL_DEVICE": device, "QUILL_DTYPE": "bfloat16", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()}
    env["QUILL_COMPILE_CACHE"] = tempfile.mkdtemp()  # no kept compiled steps either: the first start compiles
    port = free_port()
    start = time.perf_counter()
    with open(SERVER_LOG, "w") as log:
        try:
            server = start_server(BUNDLED, port, max(streams), compiled, ready_within, env=env, log=log)
        except SystemExit as e:
            raise RuntimeError(f"{e}; the server's log ends: {SERVER_LOG.read_text()[-600:]}") from None
        result = {"startup_s": time.perf_counter() - start, "compiled": compiled, "tokens_per_stream": tokens}
        try:
            asyncio.run(concurrent(port, 2, 8))  # the connection pool and the engine, warmed
            result["streams"] = [
                median_rows([asyncio.run(concurrent(port, c, tokens)) for _ in range(repeats)]) for c in streams
            ]
        finally:
            server.terminate()
            server.wait(60)
    if compiled and "decoding without it" in SERVER_LOG.read_text():
        result["note"] = "the server's compile failed: it decoded eagerly"
    return result


def median_rows(rows):
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def gpu_description(device):
    m = machine() | {"versions": versions(device)}
    if torch.device(device).type == "cuda":
        m.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        m["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32  # off by default: float32 is float32
    return m


def common_prefix(a, b):
    """How many leading tokens two greedy continuations share (after the first difference, they part)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cell(row, key, fmt="{:,.0f}"):
    return fmt.format(row[key]) if key in row else "-"


def report(results):
    m = results["machine"]
    lines = [
        "# Quill on a GPU",
        "",
        f"{m['versions']}; Python {m['python']}, host CPU {m['cpu']} ({m['cores']} cores), {m['date']}. "
        f"`{results['command']}` (scripts/gpu-check.sh). Greedy, a {PROMPT_TOKENS}-token prompt, medians of "
        f"{results['repeats']} after a warm-up; {BATCH} requests submitted together, their prefills in the time; "
        f"compiled engines built for batch sizes 1 and {BATCH}.",
        "",
        "## In process: the Engine",
        "",
    ]
    rows = []
    for r in results["engine"]:
        base = next(b for b in results["engine"] if b["model"] == r["model"] and b["variant"] == "float32 eager")
        ratio = {k: f"{r[k] / base[k]:.2f}x" for k in ("batch1_tok_s", "batch32_tok_s") if k in r and k in base}
        same = common_prefix(r.get("tokens", []), base.get("tokens", []))
        status = r.get("error") or r.get("skipped") or r.get("note") or ""
        rows.append([
            r["label"], r["variant"], cell(r, "new_tokens", "{}"), cell(r, "batch1_tok_s"),
            ratio.get("batch1_tok_s", "-"), cell(r, "batch32_tok_s"), ratio.get("batch32_tok_s", "-"),
            cell(r, "warm_up_s", "{:.1f}"), f"{same}/{r['new_tokens']}" if "tokens" in r else "-", status,
        ])  # fmt: skip
    header = ["model", "weights, step", "new tokens", "batch 1 tok/s", "x f32", f"{BATCH} requests tok/s", "x f32"]
    lines.append(markdown_table([*header, "warm-up s", "greedy = f32", "note"], rows))
    for key in ("http", "http_compiled"):
        h, compiled = results[key], key == "http_compiled"
        title = f"## Over HTTP: `python -m app` on the bundled GPT, QUILL_DTYPE=bfloat16, {key[5:] or 'eager'}"
        lines += ["", title, ""]
        if "streams" in h:
            kind = "QUILL_COMPILE=1, cold compile cache" if compiled else "eager"
            lines += [f"Start-up to `/ready`: {h['startup_s']:.1f} s ({kind}). {h.get('note', '')}", ""]
            lines.append(markdown_table(
                ["streams", "tokens each", "aggregate tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
                [[s["clients"], s["tokens_per_client"], f"{s['aggregate_tok_s']:,.0f}", f"{s['ttft_p50_ms']:.1f}",
                  f"{s['ttft_p99_ms']:.1f}", f"{s['itl_p50_ms']:.2f}", f"{s['itl_p99_ms']:.2f}"] for s in h["streams"]],
            ))  # fmt: skip
        else:
            lines.append(h.get("error") or h.get("skipped", ""))
    v = results["val_loss"]
    lines += ["", "## The bundled GPT's val loss on Tiny Shakespeare's validation split", ""]
    if "float32" in v:
        lines += [f"{v['tokens']:,} tokens, in windows of the context; the loss taken in float32.", ""]
        lines.append(markdown_table(
            ["weights", "val loss", "vs float32"],
            [["float32", f"{v['float32']:.4f}", ""], ["bfloat16", f"{v['bfloat16']:.4f}", f"{v['delta']:+.4f}"]],
        ))  # fmt: skip
    else:
        lines.append(v.get("error") or v.get("skipped", ""))
    return "\n".join(lines) + "\n"


def save(results, out_dir):
    (out_dir / "bench-gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "benchmarks-gpu.md").write_text(report(results))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="every row: 6L/384, the compiled engines and server too")
    ap.add_argument("--quick", action="store_true", help="tiny random models, few tokens, one repeat, no compiling")
    ap.add_argument("--plan", action="store_true", help="print the versions and the plan (expected times), and exit")
    ap.add_argument("--out-dir", type=Path, default=DOCS, help="where benchmarks-gpu.md and bench-gpu.json go")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="Tiny Shakespeare, for the val loss (else skipped)")
    ap.add_argument("--budget-s", type=float, default=360, help="skip what is left after this many seconds")
    args = ap.parse_args()
    try:
        pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.plan:
        print(f"gpu-check: {versions(args.device)}")
        show_plan(args.full, args.budget_s)
        return
    t0 = time.monotonic()
    specs = {key: (label, build, n) for key, label, build, n in model_specs(args.quick)}
    flags = "".join(f" --{f}" for f in ("full", "quick") if getattr(args, f))
    results = {
        "device": args.device,
        "command": f"python -m benchmarks.gpu --device {args.device}{flags}",
        "machine": gpu_description(args.device),
        "repeats": 1 if args.quick else REPEATS,
        "engine": [
            dict(model=key, label=label, variant=v, new_tokens=n, skipped="--full only")
            for key, (label, _, n) in specs.items()
            for v in VARIANTS
        ],
        "http": {"skipped": "--full only"},
        "http_compiled": {"skipped": "--full only"},
        "val_loss": {"skipped": "--full only"},
    }
    jobs = plan(args.full)
    for kind, model, variant, _ in jobs:
        result_of(results, kind, model, variant)["skipped"] = "not reached"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = {}  # the float32 model of the engine jobs running: built by the first, kept while the next are its

    for kind, model, variant, expected_s in jobs:
        into, compiled = result_of(results, kind, model, variant), variant is not None and VARIANTS[variant][1]
        if compiled and args.quick:
            into["skipped"] = "--quick: not compiled"
            continue
        if kind == "engine":
            if base.get("key") != model:
                base.clear()
                gc.collect()
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()

            def job(model=model, variant=variant, compiled=compiled):
                if "model" not in base:
                    base.update(key=model, model=specs[model][1](args.device))
                dtype = VARIANTS[variant][0]
                return measure_engine(base["model"], dtype, compiled, specs[model][2], args.device, results["repeats"])

        elif kind == "http":
            within = max(60, args.budget_s - (time.monotonic() - t0))

            def job(compiled=compiled, within=within):
                return http(args.device, args.quick, compiled, within)

        else:

            def job():
                return val_loss(args.corpus, args.device, args.quick)

        attempt(args, t0, results, job_name(kind, model, variant), expected_s, job, into)
    save(results, args.out_dir)
    print(report(results))


def result_of(results, kind, model, variant):
    """The dict in `results` that a job of the plan fills."""
    if kind == "engine":
        return next(r for r in results["engine"] if (r["model"], r["variant"]) == (model, variant))
    return results["val_loss"] if kind == "val loss" else results["http_compiled" if "compiled" in variant else "http"]


def attempt(args, t0, results, name, expected_s, job, into):
    """Run job() and write its result into the dict `into` unless the budget is spent; a failure is recorded
    there, not raised. The report is rewritten after each, so a run cut short keeps it."""
    start = time.monotonic()
    left = args.budget_s - (start - t0)
    if left < expected_s:
        result = {"skipped": f"time budget: {left:.0f} s left of {args.budget_s:.0f}"}
    else:
        try:
            into.pop("skipped", None)
            result = job()
        except (Exception, SystemExit) as e:  # SystemExit: a corpus that cannot be read, say
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
    into.update(result)
    save(results, args.out_dir)
    took = time.monotonic() - start
    print(f"[{time.monotonic() - t0:.0f} s] {name}: {took:.1f} s (expected {expected_s} s on a GPU)", flush=True)
    print(f"    {json.dumps(result)[:300]}", flush=True)


if __name__ == "__main__":
    main()
