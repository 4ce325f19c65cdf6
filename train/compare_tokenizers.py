"""Characters, bytes or BPE? The same GPT trained for the same time with each tokenizer, compared in
bits per byte of the same validation text.

    python -m train.compare_tokenizers --corpus shakespeare=../shared/data/tinyshakespeare.txt \\
        --corpus stdlib=stdlib.txt --minutes 5 [--tokenizers char byte bpe:512 bpe:2048]

For each corpus and tokenizer: time a short run to learn its iterations per second, give it the
iterations that fill the budget (so every tokenizer trains for the same time, not the same number
of steps: a larger vocabulary costs more per step), train, then measure the loss over the whole
validation split and turn it into bits per byte, which compare across tokenizers where a loss per
token does not. Writes docs/tokenizers.md, .png and .json. A finished run is reused, so an
interrupted comparison continues where it stopped (remove --runs to start afresh). With --measure RUN...,
it trains nothing and prints the same table for runs trained elsewhere (e.g. the bundled GPT).
"""

import argparse
import json
import math
import shlex
import statistics
from pathlib import Path

import torch

from model import load_checkpoint
from model.checkpoint import CheckpointError, read_safetensors
from model.engine import Engine
from train.config import parse_config
from train.data import encode_text, full_loss, read_corpus, split_text
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ["--preset", "cpu"]  # nanoGPT's CPU recipe: minutes-scale runs on this machine
CALIBRATION_ITERS = 30
SAMPLE_BYTES = 300
SEED = 1234
SETTINGS_NAME = "comparison.json"  # beside a run: the settings it was trained under, to reuse it only for those


def trainer_args(corpus, out, spec, extra):
    kind, _, vocab = spec.partition(":")
    args = ["--data", str(corpus), "--out", str(out), "--tokenizer", kind, *RECIPE, *extra]
    return args + (["--vocab-size", vocab] if vocab else [])


def seconds_per_iter(corpus, spec, extra, scratch):
    """The median time of a step of this tokenizer's model, from a short run's log."""
    args = trainer_args(corpus, scratch, spec, extra)
    calibration = ["--max-iters", str(CALIBRATION_ITERS), "--eval-interval", "100000", "--log-interval", "1"]
    train(parse_config([*args, *calibration, "--overwrite"]))
    rows = [json.loads(line) for line in (scratch / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["iter"] >= CALIBRATION_ITERS // 3]
    cfg = parse_config(args)
    return cfg.batch_size * cfg.context_size * cfg.gradient_accumulation_steps / statistics.median(rates)


def finished(out, settings):
    """Whether `out` holds a run of these settings (budget, corpus, options) that ran to its end."""
    try:
        _, state = read_safetensors(out / "resume.safetensors")
        same = json.loads((out / SETTINGS_NAME).read_text()) == settings
    except Exception:  # absent, cut short, or from an older comparison: train it (again)
        return False
    return same and state["iter"] == state["train_config"]["max_iters"]


def run_one(corpus, spec, budget, extra, runs):
    out = runs / spec.replace(":", "-")
    settings = {"seconds": budget, "corpus": str(corpus), "corpus_sha256": read_corpus(corpus)[1], "extra": extra}
    if not finished(out, settings):
        per_iter = seconds_per_iter(corpus, spec, extra, runs / "calibration")
        iters = max(1, round(budget / per_iter))
        args = trainer_args(corpus, out, spec, extra)
        train(
            parse_config([*args, "--max-iters", str(iters), "--eval-interval", str(max(1, iters // 10)), "--overwrite"])
        )
        (out / SETTINGS_NAME).write_text(json.dumps(settings))
    return out


def describe(run, text, sha):
    """Size, time, the whole validation split's loss and bits per byte, and a sample, of one run."""
    try:
        model, tokenizer, meta = load_checkpoint(run)
        corpus = encode_text(tokenizer, text, sha)
    except (CheckpointError, ValueError) as e:  # not a checkpoint; a character model that lacks the text's characters
        raise SystemExit(f"cannot measure {run}: {e}") from None
    context = getattr(model.config, "context_size", None) or meta.get("train_config", {}).get("context_size", 256)
    loss = full_loss(model, corpus.splits["val"], context)
    bytes_per_token = corpus.bytes["val"] / len(corpus.splits["val"])
    prompt = split_text(text)[1][:40]  # the start of the validation text
    engine = Engine(model, max_batch=1)
    ids = engine.generate(
        tokenizer.encode(prompt), math.ceil(SAMPLE_BYTES / bytes_per_token), temperature=0.8, seed=SEED
    )
    log_path = Path(run) / "log.jsonl"  # an imported model, or a loose .safetensors file, has none
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    return {
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "iters": meta.get("train_config", {}).get("max_iters", meta.get("iter", 0)),
        "train_seconds": meta.get("train_seconds", 0.0),
        "tokens_seen": meta.get("tokens_seen", 0),
        "bytes_per_token": bytes_per_token,
        "val_loss": loss,
        "val_bpb": corpus.bits_per_byte("val", loss),
        "prompt": prompt,
        "sample": tokenizer.decode(ids),
        "curve": [(r["seconds"], r["val_bpb"]) for r in log if r["kind"] == "eval" and "val_bpb" in r],
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        for r in rows:
            label = f"{r['tokenizer']} ({r['vocab_size']})"
            ax.plot([s / 60 for s, _ in r["curve"]], [b for _, b in r["curve"]], "o-", label=label)
        ax.set_title(name)
        ax.set_xlabel("training time (minutes)")
        ax.set_ylabel("validation bits per byte (estimate)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def table(rows):
    lines = [
        "| tokenizer | vocab | parameters | steps | training time | tokens seen | bytes/token | val loss/token "
        "| **bits/byte** |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab_size']} | {r['parameters'] / 1e6:.2f}M | {r['iters']} "
            f"| {r['train_seconds'] / 60:.1f} min | {r['tokens_seen'] / 1e6:.1f}M | {r['bytes_per_token']:.2f} "
            f"| {r['val_loss']:.4f} | **{r['val_bpb']:.3f}** |"
        )
    return lines


def report(results, minutes, figure):
    lines = [
        "# Characters, bytes or BPE",
        "",
        f"Generated by `python -m train.compare_tokenizers` ({minutes:g} minutes of training each, nanoGPT's CPU "
        "recipe: 4 layers, 4 heads, 128 wide, context 64 tokens, batch 12). Bits per byte are measured over the "
        "whole validation split (the last 10% of the corpus's bytes, the same text for every tokenizer); the loss "
        "per token is not comparable across tokenizers, bits per byte are.",
        "",
    ]
    for name, rows in results.items():
        lines += [f"## {name}", "", *table(rows), ""]
    lines += [f"![validation bits per byte against training time]({figure.name})", ""]
    notes = figure.parent / "tokenizers-notes.md"  # the reading of the numbers, written by a person
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += [f"## Samples (about {SAMPLE_BYTES} bytes, temperature 0.8, seed {SEED})", ""]
    for name, rows in results.items():
        for r in rows:
            lines += [
                f"### {name}, {r['tokenizer']} ({r['vocab_size']})",
                "",
                "```",
                r["prompt"] + r["sample"],
                "```",
                "",
            ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", action="append", required=True, metavar="NAME=PATH", help="a corpus to compare on")
    ap.add_argument("--tokenizers", nargs="+", default=["char", "byte", "bpe:512", "bpe:2048"])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per tokenizer")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "tokenizers", help="where the runs go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "tokenizers.md")
    ap.add_argument("--train-args", default="", help="more trainer options, e.g. '--threads 1'")
    ap.add_argument(
        "--measure", nargs="+", metavar="RUN", help="train nothing: measure these runs on the corpus, print a table"
    )
    args = ap.parse_args(argv)
    corpora = dict(c.split("=", 1) for c in args.corpus if "=" in c)
    if len(corpora) != len(args.corpus):
        ap.error("--corpus takes NAME=PATH")
    for spec in args.tokenizers:  # every spec is checked before anything trains for minutes
        kind, _, vocab = spec.partition(":")
        if kind not in ("char", "byte", "bpe") or (
            vocab and (kind != "bpe" or not vocab.isdigit() or int(vocab) < 256)
        ):
            ap.error(f"--tokenizers {spec!r}: give char, byte or bpe:N with N >= 256")
    torch.manual_seed(0)
    if args.measure:
        for name, path in corpora.items():
            text, sha = read_corpus(path)
            print("\n".join([f"## {name}", "", *table([describe(Path(run), text, sha) for run in args.measure])]))
        return
    results = {}
    for name, path in corpora.items():
        text, sha = read_corpus(path)
        runs = [
            run_one(path, spec, args.minutes * 60, shlex.split(args.train_args), args.runs / name)
            for spec in args.tokenizers
        ]
        results[name] = [describe(run, text, sha) for run in runs]
        for r in results[name]:
            print(f"{name} {r['tokenizer']} ({r['vocab_size']}): {r['val_bpb']:.3f} bits/byte, {r['iters']} steps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = args.out.with_suffix(".png")
    plot(results, figure)
    args.out.write_text(report(results, args.minutes, figure) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}, {figure} and {args.out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
