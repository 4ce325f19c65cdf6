"""A soak: a real `python -m app` (its default settings, engine child process and background compile) kept busy
by concurrent streams, with random sampling settings, random client disconnects and a few scoring requests.

    python -m benchmarks.soak [--minutes 60] [--streams 32] [--seed N] [--model CHECKPOINT] [--out docs/soak.json]
    python -m benchmarks.soak --report-only      # docs/reliability.md's soak table again, from the JSON
    (make soak, make soak MINUTES=5)

The load starts at /ready and runs through the background compile; --minutes are counted from the moment /ready
lists every batch size compiled. The first W of those minutes are the warm-up (W: 5 minutes, or a fifth of a run
shorter than 25 minutes): the memory baseline is the first sample after it, and TTFT is compared between the
first W and the last W. Errors: any status but 200, an `error` event or error object in a stream, a stream that
ends without its end (`done`, [DONE]) unless the client cut it, any transport failure, and a non-zero exit on
SIGTERM at the end.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import machine, percentile
from benchmarks.http import free_port, wait_ready
from benchmarks.memory import tree_memory

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
SCORING = "scoring"  # echo + logprobs with max_tokens 0 on /v1/completions
CUT_SHARE, SCORING_SHARE = 0.2, 0.04  # of requests: streams the client cuts at a random event; texts scored
SAMPLE_EVERY = 10.0  # seconds between memory samples
MARKERS = ("<!-- soak:start -->", "<!-- soak:end -->")
# prompts are slices of this (every character is in the bundled models' vocabulary)
TEXT = """First Citizen:
Before we proceed any further, hear me speak.
All:
Speak, speak.
ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
HAMLET:
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles.
"""
STOPS = ["\n\n", "\n", ".", "ROMEO", "the", ":", "And"]


def window_s(minutes):
    return min(300.0, minutes * 60 / 5)


def prompt(rng, longest=120):
    start = rng.randrange(len(TEXT) - 2)
    text = TEXT[start : start + rng.randint(1, longest)]
    return text if text.strip() else "ROMEO:"


def body_for(route, rng):
    """A valid body for `route` with random sampling settings (streamed, except scoring's)."""
    if route == SCORING:
        return {"prompt": prompt(rng, 600), "max_tokens": 0, "echo": True, "logprobs": rng.randint(0, 5)}
    body = {"seed": rng.randrange(2**53), "temperature": rng.choice([0.0, round(rng.uniform(0.2, 1.5), 2)])}
    if rng.random() < 0.3:
        body["top_p"] = round(rng.uniform(0.05, 1.0), 3)
    if rng.random() < 0.2:
        body["min_p"] = round(rng.uniform(0.0, 0.3), 3)
    if rng.random() < 0.2:
        body["repetition_penalty"] = round(rng.uniform(0.8, 1.5), 2)
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    tokens, logprobs = rng.randint(1, 300), rng.random() < 0.1
    if route == "/generate":
        body |= {"prompt": prompt(rng), "max_new_tokens": tokens}
        if rng.random() < 0.3:
            body["top_k"] = rng.randint(1, 100)
        if logprobs:
            body["logprobs"] = rng.randint(0, 5)
        return body
    body |= {"max_tokens": tokens, "stream": True, "n": 2 if rng.random() < 0.1 else 1}
    if rng.random() < 0.2:
        body |= {"presence_penalty": round(rng.uniform(-1, 1), 2), "frequency_penalty": round(rng.uniform(-1, 1), 2)}
    if rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    if route == "/v1/completions":
        body["prompt"] = prompt(rng)
        if logprobs:
            body["logprobs"] = rng.randint(0, 5)
    else:
        body["messages"] = [{"role": "user", "content": prompt(rng)}]
        if rng.random() < 0.2:
            body["messages"].insert(0, {"role": "system", "content": prompt(rng, 40)})
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
    return body


async def sse(response):
    """(event name, data) of a server-sent event stream, as they arrive."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield name, "\n".join(data)
            name, data = "message", []
    if data:
        yield name, "\n".join(data)


def carries_token(route, name, data):
    """Whether an event brings generated text: /generate's `token`; a chunk with text, content or a finish."""
    if route == "/generate":
        return name == "token"
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        return False
    part = choices[0].get("delta", choices[0])
    return bool(part.get("text") or part.get("content") or choices[0].get("finish_reason"))


async def stream_one(client, url, route, body, cut_at):
    """("served" | "cut" | an error's description, seconds to the first token or None)."""
    t0, first, seen = time.monotonic(), None, 0
    async with client.stream("POST", url + route, json=body) as r:
        if r.status_code != 200:
            return f"{r.status_code}: {(await r.aread())[:200].decode(errors='replace')}", None
        async for name, raw in sse(r):
            if cut_at is not None and seen >= cut_at:
                return "cut", None  # leaving the block closes the connection mid-stream
            seen += 1
            data = raw if raw == "[DONE]" else json.loads(raw)
            if name == "error" or (isinstance(data, dict) and "error" in data):
                return f"stream error: {raw[:200]}", None
            if first is None and carries_token(route, name, data):
                first = time.monotonic() - t0
            if name == "done" or data == "[DONE]":
                return "served", first
    return f"stream ended after {seen} events without its end", None


async def score_one(client, url, body):
    r = await client.post(url + "/v1/completions", json=body)
    if r.status_code != 200:
        return f"{r.status_code}: {r.text[:200]}", None
    scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    return ("served" if scored and scored[0] is None else f"scoring answered {r.text[:200]}"), None


class Soak:
    def __init__(self, url, pid, args):
        self.url, self.pid, self.args = url, pid, args
        self.t0 = time.monotonic()
        self.stopping = False
        self.served, self.cut, self.errors = Counter(), Counter(), []
        self.ttft, self.memory = [], []  # [t, seconds]; [t, rss_mb, pss_mb, processes]

    def now(self):
        return time.monotonic() - self.t0

    async def worker(self, client, rng):
        while not self.stopping:
            route = SCORING if rng.random() < SCORING_SHARE else rng.choice(ROUTES)
            body, sent = body_for(route, rng), self.now()
            cut_at = rng.randint(0, 40) if route != SCORING and rng.random() < CUT_SHARE else None
            try:
                if route == SCORING:
                    outcome, first = await score_one(client, self.url, body)
                else:
                    outcome, first = await stream_one(client, self.url, route, body, cut_at)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as e:
                outcome, first = f"{type(e).__name__}: {e}", None
            if outcome == "served":
                self.served[route] += 1
                if first is not None:
                    self.ttft.append([round(sent, 3), round(first, 4)])
            elif outcome == "cut":
                self.cut[route] += 1
            else:
                self.errors.append({"t": round(sent, 1), "route": route, "what": outcome, "body": body})
                print(f"soak: error at {sent:.0f} s on {route}: {outcome}", file=sys.stderr)

    def sample(self):
        m = tree_memory(self.pid)
        self.memory.append([round(self.now(), 1), round(m["rss_mb"], 1), round(m["pss_mb"], 1), m["processes"]])

    async def sampler(self):
        while not self.stopping:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(SAMPLE_EVERY)

    async def compiled(self, client, proc, within):
        """Seconds from the load's start to every batch size compiled, and "done", or "eager" when /ready lists no
        model compiling (the compile failed, or there is no compiler: the server log says which)."""
        while self.now() < within and proc.poll() is None:
            r = await client.get(self.url + "/ready")
            state = r.json().get("compiled", {}) if r.status_code == 200 else None
            if state == {}:
                return self.now(), "eager"
            if state and all(sorted(s["compiled_batch_sizes"]) == sorted(s["batch_sizes"]) for s in state.values()):
                return self.now(), "done"
            await asyncio.sleep(1)
        raise SystemExit(f"soak: the server exited or did not compile within {within:.0f} s")

    async def run(self, proc):
        limits = httpx.Limits(max_connections=self.args.streams * 2, max_keepalive_connections=self.args.streams)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as client:
            rngs = [random.Random(self.args.seed * 1000 + i) for i in range(self.args.streams)]
            tasks = [asyncio.create_task(self.worker(client, rng)) for rng in rngs]
            tasks.append(asyncio.create_task(self.sampler()))
            self.compiled_at, self.compile_state = await self.compiled(client, proc, self.args.compile_timeout)
            print(f"soak: compile {self.compile_state} after {self.compiled_at:.0f} s of load", file=sys.stderr)
            self.end = self.compiled_at + self.args.minutes * 60
            while self.now() < self.end and proc.poll() is None:
                await asyncio.sleep(min(1.0, self.end - self.now()))
            await asyncio.to_thread(self.sample)
            self.stopping = True
            await asyncio.wait(tasks, timeout=300)
            self.metrics = (await client.get(self.url + "/metrics")).text if proc.poll() is None else ""


def server_5xx(metrics):
    """The server's own count of 5xx answers (not /ready's, which a starting server gives)."""
    lines = [line for line in metrics.splitlines() if line.startswith("quill_requests_total{")]
    return int(sum(float(line.split()[-1]) for line in lines if 'status="5' in line and 'route="/ready"' not in line))


def figures(soak, minutes):
    w, start, end = window_s(minutes), soak.compiled_at, soak.end
    first = [s for t, s in soak.ttft if start <= t < start + w]
    last = [s for t, s in soak.ttft if end - w <= t <= end]
    after = [m for m in soak.memory if m[0] >= start + w] or soak.memory[-1:]
    by_minute = {}
    for t, s in soak.ttft:
        by_minute.setdefault(int(t // 60), []).append(s)
    return {
        "window_s": w,
        "compile": {"state": soak.compile_state, "after_s": round(soak.compiled_at, 1)},
        "served": dict(soak.served),
        "cut": dict(soak.cut),
        "errors": len(soak.errors),
        "error_samples": soak.errors[:20],
        "memory": {"at_ready": soak.memory[0], "after_warm_up": after[0], "end": soak.memory[-1]},
        "memory_samples": soak.memory,
        "ttft_first": {"n": len(first), "p50": percentile(first, 50), "p99": percentile(first, 99)},
        "ttft_last": {"n": len(last), "p50": percentile(last, 50), "p99": percentile(last, 99)},
        "ttft_by_minute": {m: [len(v), percentile(v, 50), percentile(v, 99)] for m, v in sorted(by_minute.items())},
    }


def goal(change, bound, symmetric):
    off = abs(change) if symmetric else change
    return "met" if off < bound else f"missed by {off - bound:.1f} points"


def report(results):
    """The soak section of docs/reliability.md, from the results alone."""
    s, m, f = results["settings"], results["machine"], results["figures"]
    w = f"{f['window_s'] / 60:g} min" if f["window_s"] >= 60 else f"{f['window_s']:.0f} s"
    served, cut = f["served"], f["cut"]
    by_route = ", ".join(f"{r} {served.get(r, 0):,}" for r in (*ROUTES, SCORING))
    mem = f["memory"]
    rss0, rss1, pss0, pss1 = mem["after_warm_up"][1], mem["end"][1], mem["after_warm_up"][2], mem["end"][2]
    growth = 100 * (rss1 - rss0) / rss0
    errors = f["errors"] + (results["exit_code"] != 0)
    rows = [
        f"| requests served | {sum(served.values()):,}: {by_route} | |",
        f"| cut by the client | {sum(cut.values()):,} | |",
        f"| errors | {errors} (the server's own 5xx count: {results['server_5xx']}; exit code on SIGTERM: "
        f"{results['exit_code']}) | 0: {'met' if errors == 0 else f'missed by {errors}'} |",
        f"| tree RSS (VmRSS sum) at /ready, after warm-up, at the end | {mem['at_ready'][1]:,.0f}, {rss0:,.0f}, "
        f"{rss1:,.0f} MB (**{growth:+.1f}%** after warm-up) | growth < 5%: {goal(growth, 5, False)} |",
        f"| tree PSS after warm-up, at the end | {pss0:,.0f}, {pss1:,.0f} MB ({100 * (pss1 - pss0) / pss0:+.1f}%) | |",
    ]
    for q in ("p50", "p99"):
        a, b = f["ttft_first"][q] * 1000, f["ttft_last"][q] * 1000
        change = 100 * (b - a) / a
        rows.append(
            f"| TTFT {q}, first {w} → last {w} | {a:.0f} → {b:.0f} ms (**{change:+.1f}%**) | "
            f"within 10%: {goal(change, 10, True)} |"
        )
    la0, la1 = results["load_start"], results["load_end"]
    return "\n".join(
        [
            f"`{results['command']}`, {m['date']}: {s['minutes']:g} min of {s['streams']} streams after the "
            f"background compile ({f['compile']['state']} after {f['compile']['after_s']:.0f} s of the same load); "
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average (1, 5, 15 min) "
            f"{', '.join(f'{x:.2f}' for x in la0)} at the start, {', '.join(f'{x:.2f}' for x in la1)} at the end. "
            f"Warm-up and TTFT windows: the first and last {w} of the {s['minutes']:g} min "
            f"({f['ttft_first']['n']:,} and {f['ttft_last']['n']:,} streams). "
            "From docs/soak.json by `python -m benchmarks.soak --report-only`.",
            "",
            "| figure | measured | goal |",
            "|---|---|---|",
            *rows,
        ]
    )


def write_section(page, text):
    start, end = MARKERS
    doc = page.read_text()
    if doc.count(start) != 1 or doc.count(end) != 1:
        raise SystemExit(f"{page}: no single {start} ... {end} pair to write between")
    head, rest = doc.split(start)
    page.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="of load after the background compile")
    ap.add_argument("--streams", type=int, default=32, help="requests kept in flight")
    ap.add_argument("--seed", type=int, default=0, help="seeds each client's random choices")
    ap.add_argument("--model", help="a checkpoint to serve (default: what `python -m app` serves)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.json")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "reliability.md", help="the page with the table")
    ap.add_argument("--compile-timeout", type=float, default=1800, help="seconds of load to wait for the compile")
    ap.add_argument("--report-only", action="store_true", help="rewrite the page's table from --out")
    args = ap.parse_args(argv)
    if not args.report_only:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "app", "--port", str(port), *(["--checkpoint", args.model] * bool(args.model))]
        # the default settings: no QUILL_* from this shell (a .env file in the working directory still counts)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_")} | {"PYTHONPATH": str(ROOT)}
        log = Path(tempfile.mkdtemp(prefix="quill-soak-")) / "server.log"
        print(
            f"soak: {args.minutes:g} min after the compile, {args.streams} streams; server log {log}", file=sys.stderr
        )
        load_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_ready(proc, url + "/ready", 600, "the server")
                soak = Soak(url, proc.pid, args)
                asyncio.run(soak.run(proc))
                proc.send_signal(signal.SIGTERM)
                exit_code = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
        shown = " ".join(["python -m benchmarks.soak", f"--minutes {args.minutes:g}", f"--streams {args.streams}"])
        results = {
            "command": shown
            + (f" --seed {args.seed}" if args.seed else "")
            + (f" --model {args.model}" * bool(args.model)),
            "started": started,
            "settings": {
                "minutes": args.minutes,
                "streams": args.streams,
                "seed": args.seed,
                "model": args.model,
                "cut_share": CUT_SHARE,
                "scoring_share": SCORING_SHARE,
                "sample_every_s": SAMPLE_EVERY,
            },
            "machine": machine(),
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "exit_code": exit_code,
            "server_5xx": server_5xx(soak.metrics),
            "server_log": str(log),
            "figures": figures(soak, args.minutes),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    text = report(json.loads(args.out.read_text()))
    write_section(args.page, text)
    print(text)


if __name__ == "__main__":
    main()
