"""The course's training loop: warmup + cosine LR, clipping, accumulation, evaluation, checkpoints."""

import contextlib
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    build_model,
    code_version,
    load_model_tensors,
    remove_stale_temp_files,
    save_checkpoint,
)
from model.device import pick_device, pick_dtype
from train.config import resumed_config
from train.data import corpus_for, get_batch
from train.inputs import plan_run
from train.resume import finished, load_resume, read_resume_state, save_resume
from train.runlog import plot_losses, trim_log, write_row

RESUME_NAME = "resume.safetensors"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
EVAL_SEED = 12345  # every evaluation reads the same batches, so estimates are comparable


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says where the last checkpoint is (empty on ranks > 0)."""


@dataclass
class Progress:
    """How far the run has come: saved with every checkpoint, so that a resumed run carries on from it."""

    best_val_loss: float = math.inf
    best_val_bpb: float = math.inf  # the same loss in bits per byte of the validation text
    tokens_seen: int = 0
    train_seconds: float = 0.0

    def meta(self, it, about):
        """A checkpoint's metadata at iteration `it`; `about` holds what stays fixed through the run."""
        seconds = round(self.train_seconds, 1)
        progress = {"best_val_loss": self.best_val_loss, "best_val_bpb": self.best_val_bpb}
        progress |= {"tokens_seen": self.tokens_seen, "train_seconds": seconds}
        return {"iter": it, **progress, **about}


@dataclass
class Run:
    """What the steps of one training run share."""

    cfg: object
    out: Path
    device: str
    model: torch.nn.Module  # the raw model (not compiled, not DDP-wrapped): the one evaluated and saved
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    corpus: object  # train.data.Corpus
    progress: Progress
    about: dict  # the checkpoint metadata that stays fixed through the run
    autocast: object
    log: object = None  # the open log file, on rank 0 only


def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_autocast(dtype, device):
    """bf16 autocast where asked for (or, with auto, on a CUDA GPU that has it natively); fp32 otherwise."""
    if pick_dtype(dtype, device) is torch.float32:  # auto: bfloat16 where it is native (model/device.py)
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


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
    held = [name for name in (WEIGHTS_NAME, RESUME_NAME) if (out / name).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise SystemExit(
            f"{out} already holds a run ({held[0]}): pass --resume to continue it or --overwrite "
            "to replace it, or choose another --out"
        )


def check_out_is_a_folder(out):
    """--out names a run folder: one that exists as a file (or lies under one) cannot be."""
    file = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        where = "is a file" if file == out else f"is inside {file}, a file"
        raise SystemExit(f"--out {out} {where}: --out must be a directory (the run folder); choose another --out")


def interrupted_message(out, it, saved):
    if saved is None:
        return f"interrupted at iteration {it}, before this run saved a checkpoint"
    return (
        f"interrupted at iteration {it}; the last checkpoint is in {out} (iteration {saved}): "
        "run the same command with --resume to continue"
    )


def start_model(plan, vocab_size, device, rank, out):
    """(model, optimizer, batch generator, first iteration, progress), as `plan` says: fresh (from the weights
    of the fine-tuned checkpoint, if any), or as the resumed run's resume state in `out` left them."""
    cfg = plan.cfg
    torch.manual_seed(cfg.seed + rank)
    data_gen = torch.Generator().manual_seed(cfg.seed + rank)
    model = build_model(cfg.model, {"vocab_size": vocab_size, **plan.architecture}).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    if plan.resume_state is None:
        if plan.init_weights is not None:
            load_model_tensors(model, plan.init_weights, plan.origin["path"])
        return model, optimizer, data_gen, 0, Progress()
    try:
        state = load_resume(out / RESUME_NAME, model, optimizer, data_gen)
    except CheckpointError as e:
        raise SystemExit(f"cannot resume: {e}") from None
    start_iter = state["iter"]
    if rank:  # only rank 0's RNG streams are saved; the others take fresh, distinct ones
        torch.manual_seed(cfg.seed + rank + start_iter)
        data_gen.manual_seed(cfg.seed + rank + start_iter)
    progress = Progress(
        state["best_val_loss"], state.get("best_val_bpb", math.inf), state["tokens_seen"], state["train_seconds"]
    )
    return model, optimizer, data_gen, start_iter, progress


def stepped_model(model, cfg, device, world):
    """The model the training steps run: wrapped for DDP under torchrun, then compiled. In that order, as
    torch's DDP notes say: compiling the wrapper splits the graph at DDP's gradient buckets, so each bucket's
    all-reduce overlaps the rest of the backward pass; DDP around a compiled model waits for all of it."""
    if world > 1:
        cuda = device.startswith("cuda")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    if cfg.compile:
        model = torch.compile(model)  # its no_sync() is the DDP wrapper's (OptimizedModule passes it through)
    return model


def evaluate_and_save(run, it, lr):
    """Estimate both losses, log them, save the weights if they are the best yet, and the resume state."""
    cfg, out, progress = run.cfg, run.out, run.progress
    losses = estimate_loss(run.model, run.corpus.splits, cfg, run.device, run.autocast)
    bpb = {name: run.corpus.bits_per_byte(name, loss) for name, loss in losses.items()}
    row = {"kind": "eval", "iter": it, "tokens": progress.tokens_seen, "seconds": round(progress.train_seconds, 2)}
    row |= {"train_loss": losses["train"], "val_loss": losses["val"], "train_bpb": bpb["train"], "val_bpb": bpb["val"]}
    write_row(run.log, {**row, "lr": lr})
    if losses["val"] < progress.best_val_loss:
        progress.best_val_loss, progress.best_val_bpb = losses["val"], bpb["val"]
        save_checkpoint(out / WEIGHTS_NAME, run.model, run.corpus.tokenizer, progress.meta(it, run.about))
    save_resume(out / RESUME_NAME, run.model, run.optimizer, run.data_gen, progress.meta(it, run.about))
    plot_losses(out / LOG_NAME, out / PLOT_NAME)
    tqdm.write(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f} ({bpb['val']:.3f} bits/byte)")


def train_step(run, model, world):
    """One optimizer step over the micro-batches; returns the last one's loss, scaled by their number."""
    cfg, steps = run.cfg, run.cfg.gradient_accumulation_steps
    for micro in range(steps):
        x, y = get_batch(run.corpus.splits["train"], cfg.batch_size, cfg.context_size, run.data_gen, run.device)
        last = micro == steps - 1
        # DDP all-reduces gradients only on the last micro-batch; no_sync() is single-use, so one block.
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
            with run.autocast:
                loss = model(x, y)[1] / steps
            loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def start_run(cfg, resume_state, out, device, rank, world):
    """(run, first iteration, resuming): the run's pieces, built from its plan, fresh or as its resume state
    left them. All that can fail on bad input (the corpus, the resume state) is read before the run folder
    is made."""
    plan = plan_run(cfg, resume_state)
    cfg, corpus = plan.cfg, corpus_for(plan)
    model, optimizer, data_gen, start_iter, progress = start_model(plan, corpus.tokenizer.vocab_size, device, rank, out)
    about = {
        "corpus_sha256": corpus.sha256,
        "code_version": code_version(),  # the code this run started with, not whatever HEAD is at save time
        "train_config": dataclasses.asdict(cfg),
        "world_size": world,
        "tokenizer": corpus.tokenizer.to_dict(),
        "bytes_per_token": {name: corpus.bytes[name] / len(ids) for name, ids in corpus.splits.items()},
        "model_type": cfg.model,
        "config": dataclasses.asdict(model.config),  # so that --resume rebuilds this model, GELU form included
    }
    if plan.origin:
        about["init_from"] = plan.origin
    autocast = make_autocast(cfg.dtype, device)
    parts = dict(model=model, optimizer=optimizer, data_gen=data_gen, corpus=corpus)
    run = Run(cfg, out, device, **parts, progress=progress, about=about, autocast=autocast)
    return run, start_iter, plan.resume_state is not None


def open_run_folder(run, start_iter, resuming, tokens_per_iter, world):
    """Make the folder (clearing what a killed save left), open the log (trimmed when resuming), say what runs."""
    run.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(run.out)
    if resuming:
        trim_log(run.out / LOG_NAME, start_iter)
    run.log = open(run.out / LOG_NAME, "a" if resuming else "w")  # noqa: SIM115 (closed at the end)
    n_params = sum(p.numel() for p in run.model.parameters())
    tqdm.write(
        f"{run.cfg.model}: {n_params / 1e6:.2f}M parameters, {tokens_per_iter} tokens/iter, "
        f"{run.corpus.tokenizer.kind} vocab {run.corpus.tokenizer.vocab_size}, device {run.device}, world {world}"
    )


def train(cfg):
    out = Path(cfg.out)
    check_out_is_a_folder(out)
    # a resumed run goes on as it was started, but for the options given; rank 0 alone says which
    resume_state = read_resume_state(out / RESUME_NAME) if cfg.resume else None
    cfg, changes = resumed_config(cfg, resume_state) if resume_state else (cfg, [])
    first = os.environ.get("RANK", "0") == "0"
    for line in changes if first else ():
        tqdm.write(line)
    if resume_state and finished(out, resume_state, cfg, say=first):
        return resume_state["best_val_loss"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = pick_device(cfg.device)
    except ValueError as e:
        raise SystemExit(f"cannot train: {e}") from None
    rank, world, device = setup_distributed(device)
    master = rank == 0
    if master:
        refuse_to_replace_a_run(out, cfg)
    # everything that can fail on bad input happens before the run folder is made
    run, start_iter, resuming = start_run(cfg, resume_state, out, device, rank, world)
    cfg = run.cfg  # with the model shape of the resumed run or the fine-tuned checkpoint
    raw_model, optimizer, progress = run.model, run.optimizer, run.progress
    model = stepped_model(raw_model, cfg, device, world)
    tokens_per_iter = cfg.batch_size * cfg.context_size * cfg.gradient_accumulation_steps * world
    created = master and not out.exists()
    if master:
        open_run_folder(run, start_iter, resuming, tokens_per_iter, world)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True)

    it, saved = start_iter, start_iter if resuming else None  # saved: the last resume state
    try:
        model.train()
        t_last = time.perf_counter()
        for it in range(start_iter, cfg.max_iters + 1):
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # a resumed run's first iteration was evaluated (and saved) before the run stopped
            evaluate = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (resuming and it == start_iter)
            if evaluate and master:
                evaluate_and_save(run, it, lr)
                saved = it
                t_last = time.perf_counter()  # evaluation time is not training time
            if it == cfg.max_iters:
                break
            loss = train_step(run, model, world)
            progress.tokens_seen += tokens_per_iter
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            progress.train_seconds += dt
            bar.update(1)
            if it % cfg.log_interval == 0 and master:
                loss_value, tok_s = loss.item() * cfg.gradient_accumulation_steps, tokens_per_iter / dt
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                seconds = round(progress.train_seconds, 2)
                row = {"kind": "train", "iter": it, "tokens": progress.tokens_seen, "seconds": seconds}
                write_row(run.log, {**row, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s})
        if master:
            save_resume(out / RESUME_NAME, raw_model, optimizer, run.data_gen, progress.meta(cfg.max_iters, run.about))
    except BaseException as e:
        bar.close()
        if run.log:
            run.log.close()
        if created and saved is None:  # a start that failed leaves no run folder behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(interrupted_message(out, it, saved) if master else "") from None
        raise
    bar.close()
    if master:
        run.log.close()
        best = f"{progress.best_val_loss:.4f} ({progress.best_val_bpb:.3f} bits/byte)"
        tqdm.write(
            f"done: best val loss {best}, {progress.tokens_seen} tokens in "
            f"{progress.train_seconds:.0f}s; best weights in {out / WEIGHTS_NAME}"
        )
    if world > 1:
        dist.destroy_process_group()
    return progress.best_val_loss
