"""The course's training loop: warmup + cosine LR, clipping, accumulation, evaluation, checkpoints."""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    build_model,
    code_version,
    load_model_tensors,
    model_tensors,
    read_safetensors,
    remove_stale_temp_files,
    save_checkpoint,
    write_safetensors,
)
from model.tokenizer import tokenizer_from_dict
from train.data import get_batch, make_tokenizer, read_corpus, split

MODEL_NAME = "model.safetensors"
RESUME_NAME = "resume.safetensors"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
EVAL_SEED = 12345  # every evaluation reads the same batches, so estimates are comparable


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says where the last checkpoint is (empty on ranks > 0)."""


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_autocast(dtype, device):
    """bf16 autocast where asked for (or, with auto, on a GPU that has it); fp32 otherwise."""
    kind = device.split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


def model_args(cfg, vocab_size):
    if cfg.model == "gpt":
        return dict(
            vocab_size=vocab_size,
            context_size=cfg.context_size,
            hidden_size=cfg.hidden_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            dropout=cfg.dropout,
        )
    return dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, n_layer=cfg.n_layer, dropout=cfg.dropout)


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, autocast):
    was_training = model.training
    model.eval()
    out = {}
    for name, data in splits.items():
        g = torch.Generator().manual_seed(EVAL_SEED)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.context_size, g, device)
            with autocast:
                losses[k] = model(x, y)[1].item()
        out[name] = losses.mean().item()
    model.train(was_training)
    return out


def save_resume(path, model, optimizer, data_gen, state):
    """Current weights, optimizer moments, RNG states and progress: all a resumed run needs."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt = optimizer.state_dict()
    for idx, s in opt["state"].items():
        for k, v in s.items():
            tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    write_safetensors(path, tensors, {**state, "param_groups": groups})


def load_resume(path, model, optimizer, data_gen):
    tensors, state = read_safetensors(path)
    load_model_tensors(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    data_gen.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


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
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())


def setup_distributed(device):
    """Under torchrun: join the process group and return (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    use_cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world, device


def refuse_to_replace_a_run(out, cfg):
    """A folder holding weights (a bundled model, an earlier run) is replaced only when asked to."""
    held = [name for name in (MODEL_NAME, RESUME_NAME) if (out / name).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise SystemExit(
            f"{out} already holds a run ({held[0]}): pass --resume to continue it or --overwrite "
            "to replace it, or choose another --out"
        )


def interrupted_message(out, it, saved):
    if saved is None:
        return f"interrupted at iteration {it}, before this run saved a checkpoint"
    return (
        f"interrupted at iteration {it}; the last checkpoint is in {out} (iteration {saved}): "
        "run the same command with --resume to continue"
    )


def train(cfg):
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    master = rank == 0
    if master:
        refuse_to_replace_a_run(out, cfg)

    # Everything that can fail on bad input happens before the run folder is made.
    text, corpus_sha = read_corpus(cfg.data)
    resume_state = None
    if cfg.resume:
        try:
            _, resume_state = read_safetensors(out / RESUME_NAME)
        except CheckpointError as e:
            raise SystemExit(f"cannot resume: {e}") from None
        if resume_state["corpus_sha256"] != corpus_sha:
            raise SystemExit("cannot resume: --data is not the corpus this run was trained on")
        tokenizer = tokenizer_from_dict(resume_state["tokenizer"])
    else:
        tokenizer = make_tokenizer(cfg.tokenizer, text)
    train_data, val_data = split(tokenizer.encode(text), cfg.context_size)

    torch.manual_seed(cfg.seed + rank)
    data_gen = torch.Generator().manual_seed(cfg.seed + rank)
    model = build_model(cfg.model, model_args(cfg, tokenizer.vocab_size)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    start_iter, best_val, tokens_seen, seconds = 0, float("inf"), 0, 0.0
    if resume_state is not None:
        state = load_resume(out / RESUME_NAME, model, optimizer, data_gen)
        start_iter, best_val = state["iter"], state["best_val_loss"]
        tokens_seen, seconds = state["tokens_seen"], state["train_seconds"]
        if rank:  # only rank 0's RNG streams are saved; the others take fresh, distinct ones
            torch.manual_seed(cfg.seed + rank + start_iter)
            data_gen.manual_seed(cfg.seed + rank + start_iter)

    is_cuda = device.startswith("cuda")
    autocast = make_autocast(cfg.dtype, device)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if is_cuda else None)

    splits = {"train": train_data, "val": val_data}
    tokens_per_iter = cfg.batch_size * cfg.context_size * cfg.gradient_accumulation_steps * world
    version = code_version()  # the code this run started with, not whatever HEAD is at save time

    def meta(it):  # read at each save: best_val, tokens_seen and seconds move on
        return {
            "iter": it,
            "best_val_loss": best_val,
            "tokens_seen": tokens_seen,
            "train_seconds": round(seconds, 1),
            "corpus_sha256": corpus_sha,
            "code_version": version,
            "train_config": dataclasses.asdict(cfg),
            "world_size": world,
            "tokenizer": tokenizer.to_dict(),
        }

    created = master and not out.exists()
    if master:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
    if master and resume_state is not None:
        trim_log(out / LOG_NAME, start_iter)
    log = open(out / LOG_NAME, "a" if cfg.resume else "w") if master else None  # noqa: SIM115 (closed at the end)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        tqdm.write(
            f"{cfg.model}: {n_params / 1e6:.2f}M parameters, {tokens_per_iter} tokens/iter, "
            f"vocab {tokenizer.vocab_size}, device {device}, world {world}"
        )

    def write_log(row):
        log.write(json.dumps(row) + "\n")
        log.flush()

    it, saved = start_iter, start_iter if resume_state is not None else None  # saved: the last resume state
    try:
        model.train()
        t_last = time.perf_counter()
        for it in range(start_iter, cfg.max_iters + 1):
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            evaluate = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (resume_state and it == start_iter)
            if evaluate and master:
                losses = estimate_loss(raw_model, splits, cfg, device, autocast)
                write_log(
                    {
                        "kind": "eval",
                        "iter": it,
                        "tokens": tokens_seen,
                        "seconds": round(seconds, 2),
                        "train_loss": losses["train"],
                        "val_loss": losses["val"],
                        "lr": lr,
                    }
                )
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    save_checkpoint(out / MODEL_NAME, raw_model, tokenizer, meta(it))
                save_resume(out / RESUME_NAME, raw_model, optimizer, data_gen, meta(it))
                saved = it
                plot_losses(out / LOG_NAME, out / PLOT_NAME)
                tqdm.write(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}")
                t_last = time.perf_counter()  # evaluation time is not training time
            if it == cfg.max_iters:
                break
            for micro in range(cfg.gradient_accumulation_steps):
                x, y = get_batch(train_data, cfg.batch_size, cfg.context_size, data_gen, device)
                last = micro == cfg.gradient_accumulation_steps - 1
                # DDP all-reduces gradients only on the last micro-batch; no_sync() is single-use, so one block.
                with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                    with autocast:
                        loss = model(x, y)[1] / cfg.gradient_accumulation_steps
                    loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_iter
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            seconds += dt
            bar.update(1)
            if it % cfg.log_interval == 0 and master:
                loss_value = loss.item() * cfg.gradient_accumulation_steps
                tok_s = tokens_per_iter / dt
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                write_log(
                    {
                        "kind": "train",
                        "iter": it,
                        "tokens": tokens_seen,
                        "seconds": round(seconds, 2),
                        "loss": loss_value,
                        "lr": lr,
                        "tokens_per_s": tok_s,
                    }
                )
        if master:
            save_resume(out / RESUME_NAME, raw_model, optimizer, data_gen, meta(cfg.max_iters))
    except BaseException as e:
        bar.close()
        if log:
            log.close()
        if created and saved is None:  # a start that failed leaves no run folder behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(interrupted_message(out, it, saved) if master else "") from None
        raise
    bar.close()
    if master:
        log.close()
        tqdm.write(
            f"done: best val loss {best_val:.4f}, {tokens_seen} tokens in {seconds:.0f}s; "
            f"best weights in {out / MODEL_NAME}"
        )
    if world > 1:
        dist.destroy_process_group()
    return best_val
