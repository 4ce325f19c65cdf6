"""What a run reads before it starts: the corpus, its tokenizer (new, the resumed run's, or the
fine-tuned checkpoint's) and, for fine-tuning, the checkpoint's architecture. Everything here that
can fail on bad input fails before the run folder is made."""

import dataclasses

from model.checkpoint import CheckpointError, file_sha256, read_safetensors, resolve_checkpoint_path
from model.gpt import GPTConfig
from model.lstm import LSTMConfig
from model.tokenizer import tokenizer_from_dict
from train.data import encode_text, is_prepared, load_prepared, make_tokenizer, read_corpus, with_bpe_dropout

ARCHITECTURE = ("model", "n_layer", "n_head", "hidden_size", "context_size")  # what --init-from decides


def model_config(cfg, vocab_size, init_config=None):
    """The model's constructor arguments: the trainer's settings of the same names, and the vocabulary.
    A field the trainer has no option for (the GELU form) comes from the fine-tuned checkpoint's config
    (an imported GPT-2 keeps its tanh GELU), or is left to its default."""
    config = {"vocab_size": vocab_size}
    for f in dataclasses.fields(GPTConfig if cfg.model == "gpt" else LSTMConfig):
        if f.name != "vocab_size" and hasattr(cfg, f.name):
            config[f.name] = getattr(cfg, f.name)
        elif f.name != "vocab_size" and f.name in (init_config or {}):
            config[f.name] = init_config[f.name]
    return config


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


def adopt_architecture(cfg, meta):
    """`cfg` with the fine-tuned checkpoint's model type and shape in place of its own."""
    shape = {k: meta["config"][k] for k in ARCHITECTURE[1:] if k in meta["config"]}
    return dataclasses.replace(cfg, model=meta["model_type"], **shape)


def encode_for_fine_tuning(tokenizer, text, sha, source, data):
    try:
        return encode_text(tokenizer, text, sha)
    except ValueError as e:  # a character vocabulary that lacks some of the new text's characters
        raise SystemExit(
            f"cannot fine-tune {source} on {data}: the text has {e}; a character model can only learn "
            "text made of its characters: train a byte or BPE model instead (--tokenizer byte or bpe)"
        ) from None


def check_resumed_corpus(resume_state, sha256):
    if resume_state and resume_state["corpus_sha256"] != sha256:
        raise SystemExit("cannot resume: --data is not the corpus this run was trained on")


def read_corpus_for(cfg, resume_state=None, init_meta=None):
    """The run's Corpus. The tokenizer is the resumed run's, else the fine-tuned checkpoint's, else the
    prepared folder's, else a new one of --tokenizer's kind."""
    fixed = resume_state or init_meta
    tokenizer = tokenizer_from_dict(fixed["tokenizer"]) if fixed else None
    if is_prepared(cfg.data):
        if cfg.bpe_dropout:
            raise SystemExit(
                f"--bpe-dropout re-encodes text in memory, and --data {cfg.data} is a prepared (tokenized) folder: "
                "pass the text file instead"
            )
        corpus = load_prepared(cfg.data)
        check_resumed_corpus(resume_state, corpus.sha256)
        prepared = corpus.tokenizer
        if (cfg.tokenizer and cfg.tokenizer != prepared.kind) or cfg.vocab_size not in (None, prepared.vocab_size):
            raise SystemExit(
                f"--data {cfg.data} was prepared with a {prepared.kind} tokenizer of {prepared.vocab_size} tokens: "
                "drop --tokenizer and --vocab-size, or prepare it again"
            )
        if tokenizer is not None and tokenizer.to_dict() != prepared.to_dict():
            source = "the resumed run's" if resume_state else "the checkpoint's"
            raise SystemExit(
                f"--data {cfg.data} was prepared with another tokenizer than {source}: prepare it again with "
                f"python -m train.prepare --tokenizer {cfg.out if resume_state else cfg.init_from}"
            )
    else:
        text, sha = read_corpus(cfg.data)
        check_resumed_corpus(resume_state, sha)
        if tokenizer is None:
            corpus = encode_text(make_tokenizer(cfg.tokenizer or "char", text, cfg.vocab_size), text, sha)
        elif resume_state:
            corpus = encode_text(tokenizer, text, sha)
        else:
            corpus = encode_for_fine_tuning(tokenizer, text, sha, cfg.init_from, cfg.data)
        if cfg.bpe_dropout:
            corpus = with_bpe_dropout(corpus, text, cfg.bpe_dropout)
    corpus.check_context(cfg.context_size)
    return corpus


def read_resume_state(path):
    try:
        return read_safetensors(path)[1]
    except CheckpointError as e:
        raise SystemExit(f"cannot resume: {e}") from None


def run_origin(cfg, resume_state):
    """(cfg, init, shape) before anything is built. A resumed run keeps the model it was started with
    (its resume state records the model's config: the fine-tuned checkpoint is not read again, and may
    have moved); a fine-tuning run takes the checkpoint's model and its weights (`init`: its (tensors,
    meta, source)). `shape` is the metadata whose model type and config the run adopts."""
    if resume_state and "config" in resume_state:
        return adopt_architecture(cfg, resume_state), None, resume_state
    init = read_init_checkpoint(cfg.init_from) if cfg.init_from else None
    if init:
        return adopt_architecture(cfg, init[1]), init, init[1]
    return cfg, None, None
