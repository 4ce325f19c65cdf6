"""The run's log (one JSON row per line) and the loss plot drawn from it."""

import io
import json
from pathlib import Path

from model.checkpoint import atomic_write_bytes


def trim_log(log_path, start_iter):
    """Drop what a killed run logged after its resume state, so the resumed log reads as one run."""
    if not log_path.exists():
        return
    keep = []
    for line in Path(log_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        # a train row at iter i is written after step i; the resume state at start_iter precedes that step
        if row["iter"] < start_iter or (row["kind"] == "eval" and row["iter"] == start_iter):
            keep.append(line.rstrip("\n") + "\n")
    atomic_write_bytes(log_path, "".join(keep).encode())


def write_row(log, row):
    log.write(json.dumps(row) + "\n")
    log.flush()


def plot_losses(log_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], alpha=0.35, label="train (batch)")
    ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (estimate)")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    scale = next((r["val_bpb"] / r["val_loss"] for r in evals if r.get("val_bpb") and r["val_loss"]), None)
    if scale:  # the validation text's bits per byte, the scale that compares across tokenizers
        right = ax.secondary_yaxis("right", functions=(lambda loss: loss * scale, lambda bpb: bpb / scale))
        right.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
