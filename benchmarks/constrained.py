"""What constrained output costs a token (issue 29 item 2): the engine's sampled decode with and without an output
format, at 1 and 32 streams, on GPT-2 small's shape with GPT-2's own 50,257-token vocabulary (the largest mask
the bundled models' users meet), its decode step compiled as the server's default is.

    python -m benchmarks.constrained [--model gpt2-small] [--rounds 3] [--tokens 64] [--quick]
    python -m benchmarks.constrained --report-only    # docs/benchmarks-constrained.md again, from the JSON
    (make bench-constrained)

Each figure: `streams` requests sent together to a started engine (the server's, without HTTP: the masks are
the engine's cost), sampled at temperature 0.8 (request i seeded i), `--tokens` new tokens each; tokens/s is every
generated token over the wall time from the first submit to the last token. The formats: none; a regex that never
completes ("[a-z ,.]+": every step masks, no request ends early); a JSON schema of one free string (the mask of a
JSON string; a request ends early when its string closes). The formats take turns, round after round; the page
shows medians, the ratio to no format, and the time a step gains. The first constrained request of a process also
builds llguidance's tables of the vocabulary: timed apart.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from app.constraints import grammar_of
from app.protocol import ResponseFormat
from benchmarks.common import DOCS, machine, markdown_table, write_between_markers
from benchmarks.peer_models import checkpoint_for
from benchmarks.peers import TOOLS
from model import load_checkpoint
from model.engine import Engine, Outcome, Request
from model.sampling import SamplingParams

README = Path(__file__).resolve().parent.parent / "README.md"
STREAMS = (1, 32)
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
FORMATS = {
    "none": None,
    "regex [a-z ,.]+": ("regex", "[a-z ,.]+"),
    "JSON schema, one string": ("response_format", {"type": "json_schema", "json_schema": {"schema": SCHEMA}}),
}
PROMPT = "Once upon a time, in a small town by the sea,"


def grammar(fmt):
    if fmt is None:
        return None
    field, value = fmt
    return grammar_of(field, ResponseFormat.model_validate(value) if field == "response_format" else value)


def wave(engine, prompt, streams, tokens, grammar_text):
    """(tokens generated, seconds, requests ended by their format) of `streams` requests sent at once."""
    outcomes = [Outcome() for _ in range(streams)]
    t0 = time.perf_counter()
    for i, outcome in enumerate(outcomes):
        params = SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, grammar=grammar_text)
        engine.submit(Request(list(prompt), params, outcome))
    for outcome in outcomes:
        outcome.done.wait()
    seconds = time.perf_counter() - t0
    ends = [o.events[-1].reason for o in outcomes]
    if any(end not in ("length", "stop") for end in ends):
        raise SystemExit(f"a request failed: {[o.events[-1] for o in outcomes if o.events[-1].reason == 'error']}")
    return sum(len(o.ids()) for o in outcomes), seconds, ends.count("stop")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="a benchmarks.peer_models name or a checkpoint path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens a request")
    ap.add_argument("--threads", type=int, default=2, help="the engine's torch threads")
    ap.add_argument("--eager", action="store_true", help="decode eagerly (the default compiles, as the server)")
    ap.add_argument("--quick", action="store_true", help="1 round, 8 tokens, into bench-constrained-quick.*")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 1, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    name = "bench-constrained" + "-quick" * args.quick
    if args.report_only:
        return print(write_pages(json.loads((DOCS / f"{name}.json").read_text())))
    torch.set_num_threads(args.threads)
    checkpoint = checkpoint_for(args.model, TOOLS / "models")
    model, tokenizer, _ = load_checkpoint(checkpoint)
    # compiled into the server's own cache (as the default server keeps its packages): a second run loads them
    engine = Engine(model, max(STREAMS), compiled=not args.eager, tokenizer=tokenizer)
    t0 = time.perf_counter()
    engine.warm_up()
    warm = time.perf_counter() - t0
    engine.start()
    prompt, grammars = tokenizer.encode(PROMPT), {label: grammar(fmt) for label, fmt in FORMATS.items()}
    t0 = time.perf_counter()
    wave(engine, prompt, 1, 2, grammars["regex [a-z ,.]+"])  # the vocabulary's tables: once a process
    first = time.perf_counter() - t0
    values = {}
    for r in range(args.rounds):
        labels = list(FORMATS)[r % len(FORMATS) :] + list(FORMATS)[: r % len(FORMATS)]  # each goes first once
        for streams in STREAMS:
            for label in labels:
                made, seconds, stopped = wave(engine, prompt, streams, args.tokens, grammars[label])
                values.setdefault(f"{streams}|{label}", []).append([made / seconds, made, stopped])
                print(f"round {r + 1}: {streams} streams, {label}: {made / seconds:.1f} tok/s", flush=True)
    engine.stop()
    raw = {
        "machine": machine(),
        "args": vars(args),
        "model": f"{checkpoint.name}: vocabulary {tokenizer.vocab_size}, context {model.config.context_size}",
        "compiled": not args.eager,
        "warm_up_s": warm,
        "first_constrained_request_s": first,
        "values": values,
    }
    (DOCS / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(write_pages(raw))


def write_pages(raw):
    """The page, and README's paragraph for a full run of the default model."""
    args, page = raw["args"], report(raw)
    (DOCS / ("bench-constrained-quick.md" if args["quick"] else "benchmarks-constrained.md")).write_text(page + "\n")
    if not args["quick"] and args["model"] == "gpt2-small" and README.parent / "docs" == DOCS:
        write_between_markers(README, "bench-constrained", readme_block(raw))
    return page


def readme_block(raw):
    med = {key: statistics.median(v[0] for v in runs) for key, runs in raw["values"].items()}
    cells = []
    for streams in STREAMS:
        base = med[f"{streams}|none"]
        each = [f"{label} {med[f'{streams}|{label}'] / base:.2f}x" for label in FORMATS if label != "none"]
        cells.append(f"{streams} stream{'s' * (streams > 1)} ({base:,.0f} tok/s with none): " + ", ".join(each))
    m = raw["machine"]
    return (
        f"What the masks cost (`make bench-constrained`, {m['cpu']}, {m['cores']} cores, {m['date']}; "
        "[docs/benchmarks-constrained.md](docs/benchmarks-constrained.md), which writes this paragraph): sampled "
        f"tokens/s with a format over none on {raw['model']}, {'compiled' if raw['compiled'] else 'eager'}: "
        + "; ".join(cells)
        + f". A process's first constrained request also builds llguidance's tables of the vocabulary "
        f"({raw['first_constrained_request_s']:.2f} s)."
    )


def report(raw):
    args, rows = raw["args"], []
    for streams in STREAMS:
        base = statistics.median(v[0] for v in raw["values"][f"{streams}|none"])
        for label in FORMATS:
            runs = raw["values"][f"{streams}|{label}"]
            tps = statistics.median(v[0] for v in runs)
            rows.append(
                [
                    streams,
                    label,
                    f"{tps:,.1f}",
                    f"{tps / base:.3f}",
                    f"{1000 * streams * (1 / tps - 1 / base):+.2f}",  # ms a decode step of `streams` rows
                    f"{sum(v[2] for v in runs)} of {streams * len(runs)}",
                ]
            )
    header = ["streams", "format", "tok/s", "ratio to none", "ms a step gains", "ended by the format"]
    m = raw["machine"]
    return "\n".join(
        [
            "# What constrained output costs a token",
            "",
            f"Generated by `python -m benchmarks.constrained` (options {json.dumps(args)}) on {m['cpu']}, "
            f"{m['cores']} cores, torch {m['torch']}, {m['date']}. Model: {raw['model']}; decode step "
            f"{'compiled (the server default)' if raw['compiled'] else 'eager'}. "
            f"Medians over {args['rounds']} rounds, {args['tokens']} new tokens a request, sampled (temperature 0.8).",
            "",
            markdown_table(header, rows),
            "",
            f"The first constrained request of a process built llguidance's tables of the vocabulary: "
            f"{raw['first_constrained_request_s']:.2f} s (a 2-token request, those tables included). "
            "How it is measured: benchmarks/constrained.py's docstring.",
        ]
    )


if __name__ == "__main__":
    main()
