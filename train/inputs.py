"""What a run is, decided once before anything is built: a Plan. It says where the corpus comes from (a text
file or a prepared folder), which tokenizer encodes it (the resumed run's, the fine-tuned checkpoint's, or
else the prepared folder's or a new one), which model is built (the options' shape, the resumed run's, or
the checkpoint's), and whether the run resumes or starts from a checkpoint's weights. The corpus, then the
model and its optimizer, are built from it (train.data.corpus_for, train.loop.start_model). Everything
here that can fail on bad input fails before the run folder is made."""

import dataclasses
from dataclasses import dataclass

from model.checkpoint import CheckpointError, file_sha256, read_safetensors, resolve_checkpoint_path
from model.gpt import GPTConfig
from model.lstm import LSTMConfig
from model.tokenizer import tokenizer_from_dict
from train.config import SHAPE
from train.data import is_prepared


@dataclass(frozen=True)
class Plan:
    """What one run is. `cfg`'s model type and shape are the ones built: the options', or the resumed
    run's, or the fine-tuned checkpoint's."""

    cfg: object  # train.config.TrainConfig
    architecture: dict  # the model's constructor arguments but its vocabulary size, which the tokenizer sets
    prepared: bool  # --data is a folder that python -m train.prepare made, not a text file
    tokenizer: object = None  # the resumed run's or the checkpoint's; None: the prepared folder's, or a new one
    resume_state: dict = None  # the state the resumed run left; None when the run starts afresh
    init_weights: dict = None  # fine-tuning: the checkpoint's tensors, which the new model starts from
    origin: dict = None  # the checkpoint the run was fine-tuned from ({"path", "sha256"}), if it was


def model_arguments(cfg, recorded=None):
    """The model's constructor arguments but vocab_size: the trainer's settings of the same names. A field
    the trainer has no option for (the GELU form) comes from the `recorded` config (the fine-tuned
    checkpoint's or the resumed run's: an imported GPT-2 keeps its tanh GELU), or is left to its default."""
    arguments = {}
    for f in dataclasses.fields(GPTConfig if cfg.model == "gpt" else LSTMConfig):
        if f.name != "vocab_size" and hasattr(cfg, f.name):
            arguments[f.name] = getattr(cfg, f.name)
        elif f.name != "vocab_size" and f.name in (recorded or {}):
            arguments[f.name] = recorded[f.name]
    return arguments


def read_init_checkpoint(path):
    """(tensors, metadata, {"path", "sha256"}) of the checkpoint that --init-from names."""
    weights = resolve_checkpoint_path(path)
    try:
        tensors, meta = read_safetensors(weights)
    except CheckpointError as e:
        raise SystemExit(f"cannot fine-tune: {e}") from None
    if not all(key in meta for key in ("model_type", "config", "tokenizer")):
        raise SystemExit(f"cannot fine-tune: {weights} lacks its model config or tokenizer")
    return tensors, meta, {"path": str(weights.resolve()), "sha256": file_sha256(weights)}


def plan_run(cfg, resume_state=None):
    """The Plan of a run of `cfg`, resumed from `resume_state` if given. A resumed run keeps the model and
    tokenizer it was started with, as its resume state records them (the checkpoint it was fine-tuned from
    is not read again, and may have moved); a fine-tuning run takes the checkpoint's model, tokenizer and
    weights."""
    init = tensors = origin = None
    if resume_state and "config" in resume_state:
        recorded = resume_state  # the metadata whose model the run builds
    else:
        init = read_init_checkpoint(cfg.init_from) if cfg.init_from else None
        recorded = init[1] if init else None
    if recorded:
        shape = {k: recorded["config"][k] for k in SHAPE if k in recorded["config"]}
        cfg = dataclasses.replace(cfg, model=recorded["model_type"], **shape)
    with_tokenizer = resume_state or recorded
    tokenizer = tokenizer_from_dict(with_tokenizer["tokenizer"]) if with_tokenizer else None
    if init:
        tensors, _, origin = init
    elif resume_state:
        origin = resume_state.get("init_from")
    prepared = is_prepared(cfg.data)
    if prepared and cfg.bpe_dropout:
        raise SystemExit(
            f"--bpe-dropout re-encodes text in memory, and --data {cfg.data} is a prepared (tokenized) folder: "
            "pass the text file instead"
        )
    arguments = model_arguments(cfg, recorded["config"] if recorded else None)
    return Plan(cfg, arguments, prepared, tokenizer, resume_state, tensors, origin)
