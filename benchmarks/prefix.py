"""Prefix caching (issue 29 item 4): time to first token of 32 requests that share one long prefix (512 tokens; a
quarter of the context less for a model whose context is shorter) and differ in a short suffix each, sent at once.
Quill with its prefix reuse (the default) and without (QUILL_PREFIX_CACHE=0), against llama-server on the same
weights (Quill's GGUF export, f32) with `cache_prompt` (its default) and without, 32 slots.

    python -m benchmarks.prefix [--models gpt2-small] [--rounds 3] [--quick] [--no-llama]
    python -m benchmarks.prefix --report-only    # docs/benchmarks-prefix.md again, from docs/bench-prefix.json
    (make bench-prefix)

Two scenarios, each with a prefix of its own that no request has sent before: "cold", the 32 at once; "warm", one
request with the prefix first, finished, then the 32. Greedy and sampled (temperature 0.8, request i seeded i).
Quill's servers are the default (measured once every batch size is compiled; the packages kept in a folder of
the run's); the systems take turns round after round, and a figure is over every request of every round. The text
of each Quill request with reuse must equal the same request's without it: the page counts those that differ.
"""

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx

from benchmarks.common import DOCS, machine, markdown_table, percentile, write_between_markers
from benchmarks.http import free_port, start_server
from benchmarks.peer_models import checkpoint_for
from benchmarks.peers import TOOLS, build_llama, export, one_stream, start_llama_server, stop
from model import load_checkpoint

BASELINE = "llama-server cache_prompt"
QUILL_SYSTEMS = {"Quill": "1", "Quill, QUILL_PREFIX_CACHE=0": "0"}
LLAMA_SYSTEMS = {BASELINE: True, "llama-server, no cache_prompt": False}
MODES = {"greedy": 0.0, "sampled": 0.8}
CLIENTS, NEW_TOKENS, PREFIX = 32, 16, 512
README = Path(__file__).resolve().parent.parent / "README.md"
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def texts(tokenizer, context, count):
    """`count` prefixes of PREFIX tokens (at most three quarters of the context), each from its own stretch of the
    corpus (Tiny Shakespeare, else README.md), and CLIENTS suffixes, a line each."""
    corpus = CORPUS.read_text() if CORPUS.exists() else (Path(__file__).parent.parent / "README.md").read_text()
    known = set(filter(encodes(tokenizer), set(corpus)))  # a character model's vocabulary lacks some
    corpus = "".join(c for c in corpus if c in known)
    length = min(PREFIX, context * 3 // 4)
    lines = [line for line in corpus.splitlines() if 8 <= len(line) <= 24][:CLIENTS]
    ids = tokenizer.encode(corpus[: 16 * length * (count + 1)])  # a token is at most a few characters
    prefixes = [tokenizer.decode(ids[i * length * 2 : i * length * 2 + length]) for i in range(count)]
    return prefixes, ["\n" + line for line in lines], length


def encodes(tokenizer):
    def ok(char):
        try:
            return bool(tokenizer.encode(char))
        except ValueError:  # a character vocabulary without it
            return False

    return ok


def quill_body(prompt, t, seed):
    return {"prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": t, "seed": seed}


def llama_body(cache):
    def body(prompt, t, seed):
        sampling = {"temperature": t, "seed": seed, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        return {"prompt": prompt, "n_predict": NEW_TOKENS, **sampling, "stream": True, "return_tokens": True} | {
            "cache_prompt": cache,
            "ignore_eos": True,
        }

    return "/completion", body, lambda d: None if "error" in d else (len(d.get("tokens") or []), d.get("content", ""))


QUILL_API = ("/generate", quill_body, lambda d: None if "error" in d else (1, d["text"]) if "id" in d else (0, ""))


async def scenario(port, api, prefix, suffixes, t, warm):
    """Each request's (TTFT in seconds, text), and how many failed: the CLIENTS requests at once, after one with
    the prefix alone when `warm`."""
    path, body, parse = api
    url = f"http://127.0.0.1:{port}{path}"
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=CLIENTS + 4)) as client:
        if warm:
            await one_stream(client, url, body(prefix, 0.0, 0), parse)
        runs = await asyncio.gather(
            *(one_stream(client, url, body(prefix + s, t, i), parse) for i, s in enumerate(suffixes))
        )
    return [(times[0] - start if times else None, text) for start, times, text, _ in runs], sum(r[3] for r in runs)


def measure(port, api, prefixes, suffixes):
    """{(mode, scenario): [(TTFT, text) per request]} and the failed count, each scenario with a prefix of its own."""
    out, failed, fresh = {}, 0, iter(prefixes)
    for mode, t in MODES.items():
        for name in ("cold", "warm"):
            out[mode, name], bad = asyncio.run(scenario(port, api, next(fresh), suffixes, t, name == "warm"))
            failed += bad
    return out, failed


def one_round(model, checkpoint, gguf, bin_dir, folder, prefixes, suffixes, ctx, record):
    for system, reuse in QUILL_SYSTEMS.items():
        env = {"QUILL_DTYPE": None, "QUILL_COMPILE_CACHE": str(folder), "QUILL_PREFIX_CACHE": reuse}
        port = free_port()
        proc = start_server(checkpoint, port, CLIENTS, compiled=True, ready_within=3600, env=env)
        try:
            record(model, system, *measure(port, QUILL_API, prefixes, suffixes))
        finally:
            stop(proc)
    if bin_dir:
        port = free_port()
        proc = start_llama_server(bin_dir, gguf, port, 2, CLIENTS, ctx)
        try:
            for system, cache in LLAMA_SYSTEMS.items():
                record(model, system, *measure(port, llama_body(cache), prefixes, suffixes))
        finally:
            stop(proc)


class Record:
    """Every request's TTFT and text by (model, mode, scenario, system), over the rounds; failed requests."""

    def __init__(self):
        self.ttft, self.texts, self.failed = {}, {}, {}

    def __call__(self, model, system, results, failed):
        for (mode, name), runs in results.items():
            key = (model, mode, name)
            self.ttft.setdefault(key, {}).setdefault(system, []).extend(t for t, _ in runs if t is not None)
            self.texts.setdefault(key, {}).setdefault(system, []).append([text for _, text in runs])
        self.failed[system] = self.failed.get(system, 0) + failed

    def runs(self):
        with_reuse, without = QUILL_SYSTEMS
        out = []
        for (model, mode, name), ttft in self.ttft.items():
            texts = self.texts[model, mode, name]
            pairs = [(a, b) for x, y in zip(texts[with_reuse], texts[without]) for a, b in zip(x, y)]
            differ = {with_reuse: sum(a != b for a, b in pairs)}
            out.append({"model": model, "mode": mode, "scenario": name, "ttft_s": ttft, "mismatches": differ})
        return out


def rows(results):
    """One row per model, mode, scenario and system: TTFT p50/p99 (ms), their ratios to BASELINE, mismatches."""
    out = []
    for run in results["runs"]:
        base = run["ttft_s"].get(BASELINE)
        for system, times in run["ttft_s"].items():
            p50, p99 = percentile(times, 50), percentile(times, 99)
            ratio = [f"{p / percentile(base, q):.2f}" if base else "-" for p, q in ((p50, 50), (p99, 99))]
            figures = [f"{p50 * 1e3:.1f}", f"{p99 * 1e3:.1f}", *ratio, run.get("mismatches", {}).get(system, "-")]
            out.append([run["model"], run["mode"], run["scenario"], system, *figures])
    return out


def report(raw):
    header = ["model", "mode", "scenario", "system", "TTFT p50 ms", "TTFT p99 ms", "p50 ratio", "p99 ratio"]
    res, box = raw["results"], raw["machine"]
    return "\n".join(
        [
            "# Prefix caching: time to first token",
            "",
            "Generated by `python -m benchmarks.prefix` from docs/bench-prefix.json; do not edit. How it measures: the",
            "module's docstring.",
            "",
            f"Command: `{res['command']}`. Machine: {box['cpu']}, {box['cores']} cores, {box['date']}. Load (`uptime`)"
            f" at start: {res['load_start']}; at end: {res['load_end']}. Failed requests: {res.get('failed', '-')}.",
            "",
            f"Ratios are to {BASELINE} (below 1 is faster). Text mismatches: Quill's texts with reuse against the same"
            " requests' without it (goal 0).",
            "",
            markdown_table([*header, "text mismatches"], rows(res)),
        ]
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-small", help="comma-separated: gpt2-small, bundled, ... (peers.py's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the bundled GPT, one round (a smoke run)")
    ap.add_argument("--no-llama", action="store_true", help="Quill's systems only (no llama.cpp build)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the page from the last results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.rounds = "bundled", 1
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    results = DOCS / "bench-prefix.json"
    if args.report_only:
        return print(write_pages(json.loads(results.read_text())))
    bin_dir = None if args.no_llama else build_llama()
    load_start, work, record, models = os.getloadavg(), TOOLS / "models", Record(), []
    for name in args.models:
        checkpoint = checkpoint_for(name, work)
        model, tokenizer, _ = load_checkpoint(checkpoint)
        ctx = model.config.context_size
        prefixes, suffixes, length = texts(tokenizer, ctx, 4 * args.rounds)  # 4 a round: each scenario's own
        gguf = export(checkpoint, "f32", work) if bin_dir else None
        models.append((f"{name} ({length}-token prefix)", checkpoint, gguf, ctx, prefixes, suffixes))
    folder = Path(tempfile.mkdtemp(prefix="compiled-"))
    try:
        for r in range(args.rounds):
            for label, checkpoint, gguf, ctx, prefixes, suffixes in models:
                print(f"== round {r + 1} of {args.rounds}: {label}", flush=True)
                fresh = prefixes[4 * r : 4 * r + 4]
                one_round(label, checkpoint, gguf, bin_dir, folder, fresh, suffixes, ctx, record)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    argv = " ".join(a for a in ["--quick" * args.quick, "--no-llama" * args.no_llama] if a)
    command = f"python -m benchmarks.prefix --models {','.join(args.models)} --rounds {args.rounds} {argv}".strip()
    load = f"{load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f}"
    end = os.getloadavg()
    raw = {
        "machine": machine(),
        "results": {
            "command": command,
            "load_start": load,
            "load_end": f"{end[0]:.2f}, {end[1]:.2f}, {end[2]:.2f}",
            "failed": sum(record.failed.values()),
            "runs": record.runs(),
        },
    }
    results.write_text(json.dumps(raw, indent=1) + "\n")
    print(write_pages(raw))


def write_pages(raw):
    """docs/benchmarks-prefix.md, and README's paragraph for a run of the default model against llama-server."""
    (DOCS / "benchmarks-prefix.md").write_text(report(raw) + "\n")
    res = raw["results"]
    default = res["command"] == "python -m benchmarks.prefix --models gpt2-small --rounds 3"  # make bench-prefix
    if default and README.parent / "docs" == DOCS:
        write_between_markers(README, "bench-prefix", readme_block(raw))
    return report(raw)


def readme_block(raw):
    """README's lines: TTFT p50 of the 32 sampled requests, warm (the prefix sent once before), each system."""
    res, box = raw["results"], raw["machine"]
    runs = [r for r in res["runs"] if r["mode"] == "sampled" and r["scenario"] == "warm"]
    cells = []
    for run in runs:
        times = {system: percentile(t, 50) * 1e3 for system, t in run["ttft_s"].items()}
        cells.append(f"{run['model']}: " + ", ".join(f"{system} {ms:,.0f} ms" for system, ms in times.items()))
    mismatches = sum(sum(r["mismatches"].values()) for r in res["runs"])
    return (
        f"Measured (`make bench-prefix`, {box['cpu']}, {box['cores']} cores, {box['date']}; "
        "[docs/benchmarks-prefix.md](docs/benchmarks-prefix.md), which writes this paragraph): time to first token, "
        "p50, of 32 sampled requests sent at once that share a prefix sent once before: "
        + "; ".join(cells)
        + f". Texts with reuse that differ from the same requests' without it: {mismatches}."
    )


if __name__ == "__main__":
    main()
