"""Training speed and model-FLOPs utilisation (MFU) against this machine's measured fp32 matmul rate.

    python -m benchmarks.train [--quick] [--data PATH]

FLOPs per token (PaLM's count, forward + backward): 6 * N + 12 * n_layer * hidden * context,
with N the parameters excluding the position embedding; the second term is attention's
QK^T and AV. MFU = FLOPs per token * tokens/s / peak, where peak is the best fp32 matmul
rate measured here on square and model-shaped products.

Runs: the `cpu` preset for its full 2000 iterations (speed and the val loss reached), a
6-layer/384/context-256 GPT for a few iterations (speed), and an LSTM of about the cpu
GPT's size for about the same time (the issue-2 comparison).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, write_results
from model import load_checkpoint
from train.config import PRESETS, TrainConfig
from train.data import encode_splits, full_loss, read_corpus
from train.loop import train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def matmul_peak(quick):
    best = 0.0
    shapes = [(768, 128, 512), (768, 512, 128), (1024, 1024, 1024), (2048, 2048, 2048)]
    for m, k, n in shapes[:2] if quick else shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps = 5 if quick else 30
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def flops_per_token(n_params, cfg):
    n = n_params - cfg.context_size * cfg.hidden_size  # position embedding: a lookup, not a matmul
    attention = 12 * cfg.n_layer * cfg.hidden_size * cfg.context_size if cfg.model == "gpt" else 0
    return 6 * n + attention


def run(name, cfg, peak, out):
    cfg.out = str(out / name)
    best = train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"][1:]  # the first step warms up
    tok_s = statistics.median(r["tokens_per_s"] for r in steps)
    model, tokenizer, meta = load_checkpoint(cfg.out)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(n_params, cfg)
    return {
        "run": name,
        "params": n_params,
        "iters": cfg.max_iters,
        "tokens_per_s": tok_s,
        "s_per_iter": cfg.batch_size * cfg.context_size / tok_s,
        "flops_per_token": fpt,
        "mfu": fpt * tok_s / peak,
        "train_seconds": meta["train_seconds"],
        "val_loss_estimate": best,
        "dir": cfg.out,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few iterations of each (a smoke test)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    args = ap.parse_args()
    peak = matmul_peak(args.quick)
    text, _ = read_corpus(args.data)
    cpu_iters = 20 if args.quick else PRESETS["cpu"]["max_iters"]
    common = dict(data=args.data, log_interval=1 if args.quick else 10, eval_interval=max(cpu_iters, 1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cpu = TrainConfig(**{**PRESETS["cpu"], **common, "max_iters": cpu_iters, "eval_iters": 20})
        results.append(run("cpu preset (GPT 4/4/128, ctx 64, batch 12)", cpu, peak, out))
        big = TrainConfig(
            **{
                **PRESETS["gpu"],
                **common,
                "max_iters": 5 if args.quick else 30,
                "batch_size": 12,
                "eval_iters": 1,
                "dropout": 0.0,
            }
        )
        results.append(run("GPT 6/6/384, ctx 256, batch 12", big, peak, out))
        # An LSTM about the cpu GPT's size, given about the cpu GPT's training time.
        probe = TrainConfig(
            **{
                **common,
                "log_interval": 1,
                "model": "lstm",
                "n_layer": 2,
                "hidden_size": 224,
                "context_size": 64,
                "batch_size": 12,
                "max_iters": 10,
                "eval_iters": 1,
                "learning_rate": 2e-3,
                "min_lr": 2e-4,
                "warmup_iters": 0,
                "dropout": 0.0,
            }
        )
        per_iter = run("probe", probe, peak, out)["s_per_iter"]
        budget = results[0]["train_seconds"]
        lstm = TrainConfig(
            **{
                **vars(probe),
                "log_interval": 10,
                "max_iters": max(10, int(budget / per_iter)),
                "warmup_iters": 100,
                "eval_interval": max(10, int(budget / per_iter)),
                "eval_iters": 20,
            }
        )
        results.append(run("LSTM 2x224, ctx 64, batch 12 (cpu preset's time)", lstm, peak, out))
        for r, cfg in zip(results, (cpu, big, lstm)):  # the full validation split, every character once
            model, tokenizer, _ = load_checkpoint(r["dir"])
            _, val = encode_splits(tokenizer, text, cfg.context_size)
            r["val_loss_full"] = full_loss(model, val, cfg.context_size)
    table = f"fp32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s\n\n" + markdown_table(
        [
            "run",
            "params",
            "iters",
            "tokens/s (median)",
            "s/iter",
            "MFU vs fp32 peak",
            "train time",
            "val loss (estimate)",
            "val loss (full split)",
        ],
        [
            [
                r["run"],
                f"{r['params'] / 1e6:.2f}M",
                r["iters"],
                f"{r['tokens_per_s']:.0f}",
                f"{r['s_per_iter']:.3f}",
                f"{100 * r['mfu']:.0f}%",
                f"{r['train_seconds']:.0f} s",
                f"{r['val_loss_estimate']:.4f}",
                f"{r['val_loss_full']:.4f}",
            ]
            for r in results
        ],
    )
    write_results("train" + ("-quick" if args.quick else ""), {"peak_flops": peak, "runs": results}, table)


if __name__ == "__main__":
    main()
