"""The trainer's settings: defaults, named presets, and the command line built from them."""

import argparse
import dataclasses
from dataclasses import dataclass, field

from train.data import DEFAULT_BPE_VOCAB

# a model's shape: with its type, what a resumed or fine-tuned run takes from the run or checkpoint it starts from
SHAPE = ("n_layer", "n_head", "hidden_size", "context_size")
# what --init-from takes from the checkpoint, so they cannot be given with it
FROM_CHECKPOINT = ("model", "tokenizer", "vocab_size", *SHAPE)
# what each command says afresh, never taken from the run it resumes
COMMAND_ONLY = ("data", "out", "resume", "overwrite", "given")


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = opt(
        None,
        "UTF-8 text file to train on, a folder made by python -m train.prepare, or 'shakespeare' to download "
        "Tiny Shakespeare",
    )
    out: str = opt(None, "run directory: best weights, resume state, log and plot")
    model: str = opt("gpt", "network to train", choices=["gpt", "lstm"])
    tokenizer: str = opt(
        None,
        "char (the default for a text file): the text's characters; byte: any UTF-8; bpe: byte-level BPE "
        "learned from the training split (a prepared folder brings its own)",
        choices=["char", "byte", "bpe"],
    )
    vocab_size: int = opt(None, f"tokens in a BPE vocabulary (default {DEFAULT_BPE_VOCAB}; at least 256)")
    bpe_dropout: float = opt(
        0.0,
        "BPE-dropout: each pass over the training text encodes it anew, skipping each merge with this "
        "probability (0.1 is usual), so a model that sees a small corpus many times sees it segmented many "
        "ways; needs a BPE tokenizer and --data FILE",
    )
    init_from: str = opt(
        None,
        "fine-tune: start from this checkpoint's weights, with its architecture and tokenizer, and a fresh "
        "optimizer and schedule",
    )
    n_layer: int = opt(4, "blocks (GPT) or stacked layers (LSTM)")
    n_head: int = opt(4, "attention heads per block (GPT only)")
    hidden_size: int = opt(128, "width of the residual stream / LSTM state")
    context_size: int = opt(64, "tokens per training sequence; the GPT's maximum context")
    batch_size: int = opt(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_iters: int = opt(2000, "optimizer steps in total; the cosine schedule ends here")
    learning_rate: float = opt(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = opt(1e-4, "floor of the cosine decay (about learning_rate / 10)")
    warmup_iters: int = opt(100, "steps of linear warmup")
    weight_decay: float = opt(0.1, "AdamW decay on matrices and embeddings only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2; 0.99 suits small batches of characters")
    grad_clip: float = opt(1.0, "clip the global gradient norm here (0 disables)")
    dropout: float = opt(0.0, "dropout everywhere; small data and long runs want 0.1-0.2")
    eval_interval: int = opt(250, "steps between evaluations (and checkpoint saves)")
    eval_iters: int = opt(200, "batches per loss estimate")
    log_interval: int = opt(10, "steps between train-loss log lines")
    seed: int = opt(1337, "seeds the weights, the batches and dropout")
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = opt(
        "auto",
        "autocast precision; auto: bfloat16 on CUDA GPUs of compute capability 8.0+ (native), else float32",
        choices=["auto", "float32", "bfloat16"],
    )
    compile: bool = opt(
        False, "torch.compile the model (needs a C compiler; pays off on GPUs)", action=argparse.BooleanOptionalAction
    )
    resume: bool = opt(
        False,
        "continue the run in --out from its resume state, with the settings it was started with; options given "
        "here replace them (but for its model, shape and tokenizer), each said in one line",
    )
    overwrite: bool = opt(False, "start afresh even if --out already holds a run")
    preset: str = opt(None, "named recipe whose values replace the defaults", choices=["cpu", "gpu"])
    threads: int = opt(
        None,
        "torch intra-op threads (default: torch's choice, one per core); lower it when "
        "another busy process shares the cores, see the README",
    )
    # Not an option: the options given on the command line, which --resume takes in place of the run's own
    # settings (None, for a config built in code: all of them). parse_config fills it.
    given: tuple = field(default=None, metadata={"cli": False})


# nanoGPT's Shakespeare-char recipes; explicit options still win over them.
SCHEDULE = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99)  # both recipes'
PRESETS = {
    "cpu": dict(
        SCHEDULE,
        n_layer=4,
        n_head=4,
        hidden_size=128,
        context_size=64,
        batch_size=12,
        max_iters=2000,
        dropout=0.0,
        eval_iters=20,
    ),
    "gpu": dict(
        SCHEDULE, n_layer=6, n_head=6, hidden_size=384, context_size=256, batch_size=64, max_iters=5000, dropout=0.2
    ),
}


def flag(name):
    return "--" + name.replace("_", "-")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a GPT or LSTM on text: characters, bytes or BPE tokens; from scratch or fine-tuned.",
    )
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        default = "" if f.default is None else f" (default: {f.default})"
        kw = {"help": f.metadata["help"] + default, "default": argparse.SUPPRESS}  # absent unless given
        if f.type is bool:
            p.add_argument(flag(f.name), action=f.metadata.get("action", "store_true"), **kw)
        else:
            p.add_argument(flag(f.name), type=f.type, choices=f.metadata.get("choices"), **kw)
    return p


def parse_config(argv=None):
    args = vars(build_parser().parse_args(argv))  # only the options given
    preset = PRESETS.get(args.get("preset"), {})
    cfg = TrainConfig(**{**preset, **args}, given=tuple(sorted({*preset, *args})))  # a preset's values are given
    problems = validate(cfg)
    if cfg.init_from:
        given = [flag(k) for k in FROM_CHECKPOINT if k in args]
        if given:
            problems.append(
                f"--init-from takes the model, its shape and its tokenizer from the checkpoint: drop {', '.join(given)}"
            )
    if problems:
        build_parser().error("; ".join(problems))
    return cfg


def validate(cfg):
    problems = []
    if not cfg.data:
        problems.append("--data is required")
    if not cfg.out:
        problems.append("--out is required")
    for name in (
        "n_layer",
        "n_head",
        "hidden_size",
        "context_size",
        "batch_size",
        "gradient_accumulation_steps",
        "eval_interval",
        "eval_iters",
        "log_interval",
    ):
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be >= 1")
    if cfg.vocab_size is not None and cfg.tokenizer != "bpe":
        problems.append("--vocab-size is for --tokenizer bpe (character and byte vocabularies are fixed by the text)")
    if cfg.vocab_size is not None and cfg.vocab_size < 256:
        problems.append("--vocab-size must be >= 256: a byte-level BPE starts from the 256 bytes")
    if cfg.threads is not None and cfg.threads < 1:
        problems.append("--threads must be >= 1")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0:
        problems.append("--max-iters and --warmup-iters must be >= 0")
    if cfg.model == "gpt" and cfg.hidden_size % cfg.n_head:
        problems.append(f"--hidden-size ({cfg.hidden_size}) must be divisible by --n-head ({cfg.n_head})")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append("--dropout must be in [0, 1)")
    if not 0.0 <= cfg.bpe_dropout < 1.0:
        problems.append("--bpe-dropout must be in [0, 1)")
    if cfg.learning_rate <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.learning_rate:
        problems.append("need 0 <= --min-lr <= --learning-rate and --learning-rate > 0")
    return problems


def run_shape(state):
    """What a resumed run cannot change, as its resume state records it: the model, its shape, its tokenizer."""
    tokenizer, config = state.get("tokenizer", {}), state.get("config", {})
    shape = {"model": state.get("model_type"), "tokenizer": tokenizer.get("kind")}
    shape |= {"vocab_size": tokenizer.get("vocab_size"), **{k: config.get(k) for k in SHAPE}}
    return {k: v for k, v in shape.items() if v is not None}  # an LSTM has no n_head; a char vocabulary no size


def resumed_config(cfg, state):
    """(config, lines): the settings a run was started with, as its resume state `state` records them (its
    max-iters, schedule, evaluation, batches, threads...), with the options given on the command line in
    their place, and one line for each option that changes a setting. The model, its shape and its
    tokenizer stay the run's: an option that would change them is refused."""
    names = [f.name for f in dataclasses.fields(cfg)]
    given = set(names if cfg.given is None else cfg.given)
    shape = run_shape(state)
    clashes = [k for k in names if k in given and k in shape and getattr(cfg, k) != shape[k]]
    if clashes:
        wrong = ", ".join(f"{flag(k)} {getattr(cfg, k)} (the run's: {shape[k]})" for k in clashes)
        raise SystemExit(
            f"cannot resume: a run keeps its model, shape and tokenizer: drop {wrong}, or start a new run "
            "with --overwrite or another --out"
        )
    saved = {k: v for k, v in state.get("train_config", {}).items() if k in names and k not in COMMAND_ONLY}
    # init_from records where the run started: a resumed run does not read it again, whatever the command says
    kept = {k: v for k, v in saved.items() if k not in given or k == "init_from"}
    resumed = dataclasses.replace(cfg, **kept)
    problems = validate(resumed)
    if problems:
        raise SystemExit("cannot resume: " + "; ".join(problems))
    changed = [k for k in names if k in saved.keys() - kept.keys() and saved[k] != getattr(cfg, k)]
    return resumed, [f"--resume: {flag(k)} {getattr(cfg, k)} in place of the run's {saved[k]}" for k in changed]
