"""The figures benchmarks.peers records (Recorder, which names each row), and the page and README's block made
from its results file alone, so that `python -m benchmarks.peers --report-only` writes them again."""

import math
import statistics

import torch

from benchmarks.common import markdown_table
from benchmarks.memory import GOAL_FIXED_MB, GOAL_WEIGHTS_SHARE, goal_mb, kv_cache_mb, weights_mb
from model import load_checkpoint
from model.quantize import quantize

# issue 13's goals for Quill over llama.cpp on the same weights, and issue 27's for sampling and memory
GOALS = {"batch 1": 1.0, "1 stream": 1.0, "32 streams": 1.2, "TTFT p99": 1.0, "sampled": 0.95, "loss": 0.01}
GPT2_STREAMS_GOAL = 1.5  # issue 32's for 32 streams on a page of GPT-2 sizes only


def http_test(clients, mode, metric):
    return f"HTTP {clients} stream{'s' * (clients > 1)} {mode}, {metric}"


def ratio_test(clients):
    return f"HTTP {clients} streams, sampled over greedy tok/s (ratio)"


def memory_test(clients, kind):
    return f"after {clients} streams: process tree {kind}, MB"


BATCH1 = "batch 1 engine, tok/s"
START = "server start to ready, s"
FIRST = {
    "ready": "first start (no kept packages) to ready, s",
    "compiled": "first start to every batch size compiled, s",
    "rounds": "first start: rounds of 32 sampled streams while compiling, count",
    "p99": "first start: TTFT p99 of those rounds, ms",
    "longest": "first start: longest TTFT of those rounds, ms",
    "failed": "first start: requests failed while compiling, count",
    "kept p99": "kept packages: TTFT p99 of the same rounds, ms",
    "kept longest": "kept packages: longest TTFT of the same rounds, ms",
}
WEIGHTS, GOAL_MB = "weights, MB", f"goal: tree RSS at most (weights + KV + {GOAL_WEIGHTS_SHARE}x weights + 400), MB"


def kv_test(running):
    return f"KV cache for {running} running, MB"


class Recorder:
    """Every round's value of each (model, test, system), in order of first appearance; greedy texts."""

    def __init__(self):
        self.values, self.texts, self.trees, self.version, self.no_repack = {}, {}, {}, "?", set()

    def __call__(self, model, test, system, value):
        self.values.setdefault((model, test, system), []).append(value)
        print(f"{model} | {test} | {system}: {value:.2f}", flush=True)

    def served(self, model, system, results, failed, memory):
        """A server's figures: per (streams, mode), its metrics; its failed requests; its process tree's memory
        after the most streams (None: not measured there)."""
        for (clients, mode), (stats, text) in results.items():
            if mode == "greedy":
                self.texts[model, system] = text
            for metric, value in stats.items():
                if clients > 1 or metric != "TTFT p99 ms":  # one request has one time to first token
                    self(model, http_test(clients, mode, metric), system, value)
        most = max(clients for clients, _ in results)
        if most > 1:
            ratio = results[most, "sampled"][0]["tok/s"] / results[most, "greedy"][0]["tok/s"]
            self(model, ratio_test(most), system, ratio)
        self(model, "HTTP requests failed, count", system, failed)
        if memory:
            self.trees[f"{model} | {system}"] = memory["each"]  # the last round's
            self(model, memory_test(most, "RSS"), system, memory["rss_mb"])
            self(model, memory_test(most, "PSS"), system, memory["pss_mb"])

    def sizes(self, model, checkpoint, systems, running):
        """What each Quill system's server needs for the model (`systems`: name -> (its settings, dtype)): its
        weights (int8 ones as they are held), its KV cache for `running` rows, and issue 27's bound on its tree
        RSS."""
        net = load_checkpoint(checkpoint)[0]
        for system, (env, dtype) in systems.items():
            size = getattr(torch, dtype).itemsize
            weights = weights_mb(net, size)
            if env.get("QUILL_QUANTIZE"):
                weights = weights_mb(quantize(load_checkpoint(checkpoint)[0], env["QUILL_QUANTIZE"]))
            kv = kv_cache_mb(net.config, size, running)
            self(model, WEIGHTS, system, weights)
            self(model, kv_test(running), system, kv)
            self(model, GOAL_MB, system, goal_mb(weights, kv))


def agreement(a, b):
    """How many leading characters two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def medians(values):
    """{(model, test): {system: the median over rounds, or for a count the sum}} from a results file's rows."""
    rows = {}
    for model, test, system, vals in values:
        rows.setdefault((model, test), {})[system] = sum(vals) if test.endswith(", count") else statistics.median(vals)
    return rows


def number(test, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{1 if test.endswith(' s') else 2 if test.endswith('(ratio)') else 0}f}"


def table(values, systems, against):
    """Medians per (model, test): each Quill system, each llama.cpp precision and the ratio of the Quill system it
    meets (`against`: precision -> system) to it. Tokens/s: higher is better; times and memory: lower."""
    header = ["model", "test", *systems]
    for d, ours in against.items():
        header += [f"llama.cpp {d}", f"{ours} / llama.cpp {d}"]
    body = []
    for (model, test), med in medians(values).items():
        row = [model, test, *(number(test, med.get(q)) for q in systems)]
        for d, ours in against.items():
            mine, peer = med.get(ours), med.get(f"llama.cpp {d}")
            compared = mine and peer and test.endswith(("tok/s", " ms", " s", " MB"))  # not a count or a ratio
            row += [number(test, peer), f"{mine / peer:.2f}x" if compared else "-"]
        body.append(row)
    return markdown_table(header, body)


def goals(raw):
    """What users get against the goals, per model: (goal, {model: cell})."""
    med, running = medians(raw["values"]), max(raw["streams"])
    models = list(raw["new_tokens"])
    rows = []

    def ratio(label, test, goal, lower=False):
        for d, ours in raw["against"].items():
            cells = {}
            for m in models:
                mine, peer = med.get((m, test), {}).get(ours), med.get((m, test), {}).get(f"llama.cpp {d}")
                if mine and peer:
                    met = goal is not None and (mine / peer <= goal if lower else mine / peer >= goal)
                    verdict = "" if goal is None else "**met** " if met else "missed "
                    cells[m] = f"{verdict}{mine / peer:.2f}x ({number(test, mine)} against {number(test, peer)})"
            sign = "" if goal is None else f" {'<=' if lower else '>='} {goal}x"
            rows.append((f"{label}, {ours} / llama.cpp {d}{sign}", cells))

    ratio("batch 1 engine, tok/s", BATCH1, GOALS["batch 1"])
    ratio("HTTP 1 stream greedy, tok/s", http_test(1, "greedy", "tok/s"), GOALS["1 stream"])
    streams_goal = GPT2_STREAMS_GOAL if all(m.startswith("GPT-2") for m in models) else GOALS["32 streams"]
    ratio(f"HTTP {running} streams greedy, tok/s", http_test(running, "greedy", "tok/s"), streams_goal)
    ratio(f"HTTP {running} streams sampled, tok/s", http_test(running, "sampled", "tok/s"), None)
    p99 = http_test(running, "greedy", "TTFT p99 ms")
    ratio(f"TTFT p99 at {running} streams greedy", p99, GOALS["TTFT p99"], lower=True)

    def per_system(label, cell):
        for system in raw["quill_systems"]:
            cells = {m: c for m in models if (c := cell(med, m, system))}
            if cells:
                rows.append((label.format(system=system), cells))

    def sampled(med, m, system):
        r = med.get((m, ratio_test(running)), {}).get(system)
        return r and f"{'**met** ' if r >= GOALS['sampled'] else 'missed '}{r:.3f}"

    def first(med, m, system):
        f = {k: med.get((m, test), {}).get(system) for k, test in FIRST.items()}
        eager = med.get((m, START), {}).get(raw["eager"])
        if f["ready"] is None:
            return None
        return (
            f"ready in {number(' s', f['ready'])} s (eager start: {number(' s', eager)}), every batch size compiled"
            f" in {number(' s', f['compiled'])} s; {f['rounds']:.0f} rounds sent meanwhile, TTFT p99"
            f" {number('', f['p99'])} ms, longest {number('', f['longest'])} (kept packages:"
            f" {number('', f['kept p99'])}, {number('', f['kept longest'])}); {f['failed']:.0f} failed"
        )

    def memory(med, m, system):
        rss, pss = (med.get((m, memory_test(running, k)), {}).get(system) for k in ("RSS", "PSS"))
        bound = med.get((m, GOAL_MB), {}).get(system)
        if rss is None or bound is None:
            return None
        verdict = "**met**" if rss <= bound else "missed"
        return f"{verdict} {rss:,.0f} (PSS {pss:,.0f}) against {bound:,.0f}"

    per_system(f"{{system}}: HTTP {running} streams, sampled over greedy tok/s >= {GOALS['sampled']}", sampled)
    per_system("{system}: first start, requests sent while it compiles (none may fail)", first)
    per_system(f"{{system}}: tree RSS after {running} streams <= the goal, MB", memory)
    losses = {m: pair for m, pair in raw["losses"].items() if pair}
    if losses:
        cells = {m: f"{b - f:+.4f} ({b:.4f}; {f:.4f})" for m, (b, f) in losses.items()}
        rows.append((f"val loss, bf16 weights - f32 (<= +{GOALS['loss']})", cells))
    return models, rows


def goals_table(raw):
    models, rows = goals(raw)
    return markdown_table(["goal", *models], [[label, *(cells.get(m, "-") for m in models)] for label, cells in rows])


def loss_line(raw):
    measured = {label: pair for label, pair in raw["losses"].items() if pair}
    corpus = raw["args"]["corpus"]
    if not measured:
        return f"What bf16 weights cost in loss was not measured: {corpus} is absent or the models cannot encode it."
    return (
        f"Validation loss per token (the last 10% of {corpus.rsplit('/', 1)[-1]}), bf16 weights against f32: "
        + "; ".join(f"{label}: {b:.4f} against {f:.4f} ({b - f:+.4f})" for label, (b, f) in measured.items())
        + "."
    )


def trees_line(raw):
    """Each server's process tree after the most streams in the last round: each process's RSS (PSS)."""
    running = max(raw["streams"])
    return f"Process trees after {running} streams, last round, MB of RSS (PSS): " + "; ".join(
        f"{server}: " + ", ".join(f"`{cmd}` {rss:,.0f} ({pss:,.0f})" for cmd, rss, pss in each)
        for server, each in raw["process_trees"].items()
    )


def report(raw, rerun):
    """The markdown page of a results file: how it was measured, the goals, the table, the greedy texts'
    agreement, the bf16 loss, the machine's load."""
    m, args, running = raw["machine"], raw["args"], max(raw["streams"])
    first = f"llama.cpp {args['dtypes'][0]}"
    agree = [f"{model}: {same} of {total} characters" for model, (same, total) in raw["greedy_agreement"].items()]
    load = [", ".join(f"{x:.2f}" for x in avg) for avg in raw["load_average"]]
    return "\n".join(
        [
            "# Quill against llama.cpp on the same weights",
            "",
            f"Generated by `python -m benchmarks.peers` from [{raw['file']}]({raw['file']}); do not edit "
            f"(`--report-only` writes it again). Measured on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
            f"llama.cpp build {raw['llama_cpp']}, {m['date']}, in {raw['minutes']:.1f} minutes. Regenerate with "
            f"`{rerun}`. Medians of {args['rounds']} interleaved round(s); a {raw['prompt_chars']}-character prompt "
            "(as many tokens in a character vocabulary, fewer in a BPE); new tokens per request and HTTP runs "
            "a round: "
            + "; ".join(f"{n} and {runs} for {label}" for label, (n, runs) in raw["new_tokens"].items())
            + ".",
            "",
            "Quill's systems are servers as users start them: **Quill** is the default (no `QUILL_COMPILE`: it "
            "serves eagerly at once and compiles its decode step in the background, one package per batch size; "
            "measured once `/ready` lists every batch size compiled), **Quill eager** is `QUILL_COMPILE=0`, "
            "**Quill bf16** the default with `QUILL_DTYPE=bfloat16` (weights and KV cache in bfloat16), compared "
            "with llama.cpp's f16 only, **Quill int8** the default with `QUILL_QUANTIZE=int8` (int8 linear weights, "
            "weight-only), compared with llama.cpp's q8_0 only. Each server runs its other defaults (one engine "
            "child process; torch threads by the model's size, app/registry.py's engine_threads). llama.cpp runs "
            f"`-t {args['threads']}`; 1 stream: `llama-server -np 1 -c CTX`, {running} streams: "
            f"`-np {running} -c {running}*CTX`; it keeps its KV cache in f16 at every weight precision (its "
            "default). Batch 1: llama-bench's `-p 0 -n N` against the engine's `generate` (compiled as the "
            f"system's server compiles), stepped in the benchmark's own process with {args['threads']} torch "
            "threads, the prefill's time taken off. HTTP: greedy (temperature 0) and sampled (temperature 0.8, "
            "the API's default; no top-k, top-p or min-p, Quill's defaults, set so on llama.cpp too; stream i "
            "seeded i), the runs of the two alternating; a round's figure is the median of its runs, tokens "
            "counted from the stream. TTFT: time to first token. Ratios are Quill's figure over llama.cpp's: "
            "higher is better for tokens/s, lower for times and memory.",
            "",
            "A run keeps its compiled packages in a folder of its own, empty at first. Each compiling system's "
            f"first start (first round) is measured apart: seconds to `/ready`, a few rounds of {running} sampled "
            "streams sent one after another as soon as it is ready, while it compiles (their TTFT and failed "
            "requests; then no more, so that the niced compiler is not starved), and seconds until every batch "
            "size is compiled; against as many rounds right after `/ready` on its next start, which loads the kept "
            f"packages. Memory: after the {running}-stream runs, the server's process tree (the server and "
            "its engine child, and any child of theirs), the sum of each process's VmRSS (/proc/PID/status: "
            "shared libraries once per process) and of its PSS (/proc/PID/smaps_rollup: shared pages split "
            f"between the processes mapping them); weights and a KV cache of {running} rows (n_layer x 2 x "
            f"{running} x (context + 1) x width) at the system's precision, and issue 27's goal for the tree RSS: "
            f"weights + KV cache + {GOAL_WEIGHTS_SHARE}x weights + {GOAL_FIXED_MB} MB. MB: 10^6 bytes.",
            "",
            "## What users get, against the goals",
            "",
            goals_table(raw),
            "",
            "## Every figure",
            "",
            table(raw["values"], raw["quill_systems"], raw["against"]),
            "",
            f"Greedy text, Quill's against {first}'s, the same from the start for: " + "; ".join(agree) + ".",
            "",
            loss_line(raw),
            "",
            trees_line(raw) + ".",
            "",
            *repack_lines(raw),
            f"Load average (`uptime`: 1, 5, 15 min) at the start: {load[0]}; at the end: {load[1]}.",
        ]
    )


def repack_lines(raw):
    """Which llama-server runs went without llama.cpp's weight repacking, and why, if any did."""
    servers = raw.get("llama_server_no_repack")
    if not servers:
        return []
    return [
        f"llama-server for {', '.join(servers)} crashed at start with its weights repacked (its default; on this "
        "machine llama.cpp's AMX kernels for quantized weights fault on batches of more than one row), so its HTTP "
        "figures are with `--no-repack`; its batch-1 figure (llama-bench, one row at a time) is with repacking.",
        "",
    ]


def readme_block(raw):
    """README's few lines on the default server against llama-server, from a full run of the default models."""
    m, running = raw["machine"], max(raw["streams"])
    med, (d, ours) = medians(raw["values"]), next(iter(raw["against"].items()))

    def over(model, test):
        mine, peer = med.get((model, test), {}).get(ours), med.get((model, test), {}).get(f"llama.cpp {d}")
        return f"{mine / peer:.2f}x" if mine and peer else "-"

    def quill(model, test, fmt=",.0f"):
        value = med.get((model, test), {}).get(ours)
        return "-" if value is None else f"{value:{fmt}}"

    per_model = []
    for model in raw["new_tokens"]:
        per_model.append(
            f"{model}: batch 1 {over(model, BATCH1)}, 1 stream {over(model, http_test(1, 'greedy', 'tok/s'))}, "
            f"{running} streams {over(model, http_test(running, 'greedy', 'tok/s'))} greedy and "
            f"{over(model, http_test(running, 'sampled', 'tok/s'))} sampled (sampled over greedy "
            f"{quill(model, ratio_test(running), '.2f')}), TTFT p99 at {running} streams "
            f"{over(model, http_test(running, 'greedy', 'TTFT p99 ms'))}; first start: `/ready` in "
            f"{quill(model, FIRST['ready'], '.1f')} s, every batch size compiled in "
            f"{quill(model, FIRST['compiled'], '.0f')} s, {quill(model, FIRST['failed'])} requests failed in the "
            f"{quill(model, FIRST['rounds'])} rounds of {running} streams sent meanwhile; process tree after {running} "
            f"streams {quill(model, memory_test(running, 'RSS'))} MB RSS ({quill(model, memory_test(running, 'PSS'))}"
            f" PSS) against a goal of {quill(model, GOAL_MB)}"
        )
    return (
        f"Against llama.cpp on the same weights (`make bench-peers`, {m['cpu']}, {m['cores']} cores, {m['date']}; "
        f"[docs/benchmarks-peers.md](docs/benchmarks-peers.md), which writes this paragraph), the default server "
        f"({ours}) over llama-server, both {d}: " + "; ".join(per_model) + "."
    )
