"""Batching over HTTP, and the cost of HTTP itself, against a real uvicorn server on loopback.

    python -m benchmarks.http [--quick] [--checkpoint PATH]

1. C concurrent streaming clients (httpx) for C in 1, 4, 16, 32, 64: aggregate tokens/s,
   time to first token and inter-token latency at p50 and p99.
2. Batch 1: tokens/s through /generate (SSE) against the engine called directly in-process.
"""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import DOCS, markdown_table, median_time, percentile, write_results
from model import load_checkpoint
from model.checkpoint import default_checkpoints
from model.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, port, max_running, compiled=False, ready_within=120, env=None, log=subprocess.DEVNULL):
    """`compiled`: QUILL_COMPILE, or None to leave it to `env` (the server's default when unset there); `env`:
    more variables for the server (QUILL_DEVICE, ...), a None value unsets one; `log`: a file for its output."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep the caller's packages
    env = {**os.environ, "QUILL_MAX_RUNNING": str(max_running), "QUILL_MAX_QUEUED": "256", **(env or {})}
    if compiled is not None:
        env["QUILL_COMPILE"] = "1" if compiled else "0"
    env = {k: v for k, v in env.items() if v is not None} | {"PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--checkpoint", str(checkpoint), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=log,
    )
    return wait_ready(proc, f"http://127.0.0.1:{port}/ready", ready_within, "the server", compiled=bool(compiled))


def wait_ready(proc, url, within, name, compiled=False):
    """`proc` once `url` answers 200 (with `compiled`, once its body also says every model's decode step is compiled
    for every batch size, or that one is not compiling: it failed); killed, and the benchmark stopped, if it exits
    or takes over `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(url, timeout=1)
            steps = r.json().get("compiled", {}).values() if compiled and r.status_code == 200 else ()
            if r.status_code == 200 and all(s["compiled_batch_sizes"] == s["batch_sizes"] for s in steps):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not become ready in {within} s (exit code {proc.poll()})")


async def one_stream(client, url, tokens, seed):
    """Returns (arrival time, token times) for one streamed generation."""
    start = time.perf_counter()
    times = []
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 1.0, "seed": seed}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: token"):
                times.append(time.perf_counter())
            elif line.startswith("event: error"):
                raise RuntimeError("the server sent an error event")
    return start, times


async def concurrent(port, clients, tokens):
    url = f"http://127.0.0.1:{port}/generate"
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        t0 = time.perf_counter()
        runs = await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, url, tokens, i) for i in range(clients))), 600
        )
        wall = time.perf_counter() - t0
    ttft = [times[0] - start for start, times in runs]
    gaps = [b - a for _, times in runs for a, b in zip(times, times[1:])]
    total = sum(len(times) for _, times in runs)
    return {
        "clients": clients,
        "tokens_per_client": tokens,
        "aggregate_tok_s": total / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(gaps, 50),
        "itl_p99_ms": 1e3 * percentile(gaps, 99),
    }


def http_overhead(checkpoint, port, tokens, repeats):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = Engine(model, max_batch=1)
    ids = tokenizer.encode(PROMPT)
    t_engine = median_time(lambda: engine.generate(ids, tokens, seed=1), repeats)
    t_http = median_time(lambda: asyncio.run(concurrent(port, 1, tokens)), repeats)
    return {
        "tokens": tokens,
        "engine_tok_s": tokens / t_engine,
        "http_tok_s": tokens / t_http,
        "ratio": t_engine / t_http,
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    c = [r["clients"] for r in rows]
    ax.plot(c, [r["aggregate_tok_s"] for r in rows], "o-", color="tab:blue", label="aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(c, [r["ttft_p99_ms"] for r in rows], "s--", color="tab:red", label="p99 time to first token")
    ax2.plot(c, [r["itl_p99_ms"] for r in rows], "^--", color="tab:orange", label="p99 inter-token latency")
    ax2.set_ylabel("milliseconds", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients, few tokens (a smoke test)")
    ap.add_argument("--checkpoint", help="default: the bundled GPT")
    ap.add_argument("--tokens", type=int, default=128, help="tokens each client generates")
    args = ap.parse_args()
    checkpoint = args.checkpoint or next(p for p in default_checkpoints() if "gpt" in p.name)
    levels, tokens, repeats = ([1, 4], 16, 1) if args.quick else ([1, 4, 16, 32, 64], args.tokens, 3)
    port = free_port()
    server = start_server(checkpoint, port, max_running=max(levels))
    try:
        asyncio.run(concurrent(port, 2, 8))  # warm the connection pool and the engine
        rows = [asyncio.run(concurrent(port, c, tokens)) for c in levels]
        overhead = http_overhead(checkpoint, port, 4 * tokens, repeats)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    base = rows[0]["aggregate_tok_s"]
    table = markdown_table(
        ["streams", "aggregate tok/s", "x one stream", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
        [
            [
                r["clients"],
                f"{r['aggregate_tok_s']:.0f}",
                f"{r['aggregate_tok_s'] / base:.1f}x",
                f"{r['ttft_p50_ms']:.0f}",
                f"{r['ttft_p99_ms']:.0f}",
                f"{r['itl_p50_ms']:.1f}",
                f"{r['itl_p99_ms']:.1f}",
            ]
            for r in rows
        ],
    )
    table += "\n\n" + markdown_table(
        ["batch 1, tokens", "engine tok/s", "/generate SSE tok/s", "HTTP / engine"],
        [
            [
                overhead["tokens"],
                f"{overhead['engine_tok_s']:.0f}",
                f"{overhead['http_tok_s']:.0f}",
                f"{overhead['ratio']:.2f}",
            ]
        ],
    )
    name = "http" + ("-quick" if args.quick else "")
    if not args.quick:
        plot(rows, DOCS / "bench-http.png")
    write_results(name, {"concurrency": rows, "overhead": overhead, "checkpoint": str(checkpoint)}, table)


if __name__ == "__main__":
    main()
