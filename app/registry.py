"""The models a server can serve: which checkpoint files the settings name (checked before anything loads),
and how one is loaded into a ServedModel with its engine. Knows no HTTP and no requests."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT, CheckpointError, load_checkpoint
from model.checkpoint import (
    BUNDLED,
    default_checkpoints,
    describe_checkpoint,
    file_sha256,
    model_name,
    resolve_checkpoint_path,
)
from model.engine import Engine
from model.engine_process import EngineProcess
from model.quantize import quantize as quantize_model

TRAIN_HINT = (
    "train one with: python -m train --data ../shared/data/tinyshakespeare.txt "
    "--out checkpoints/shakespeare-gpt --preset cpu (or see the README)"
)


@dataclass
class ServedModel:
    name: str
    path: Path
    model: object
    tokenizer: object
    meta: dict
    sha256: str
    engine: Engine | EngineProcess


def checkpoint_files(configured, default=None):
    """{model name: weights file} for the configured paths (or the run directories under checkpoints/), checked
    to exist and to name distinct models, so that a typo fails before any model is loaded. The default model, the
    one a request without `model` gets, comes first: `default` (a name) when given, else the first configured
    path, else the bundled GPT (default_checkpoints). A missing file is a CheckpointError; no checkpoint at all,
    two of one name, or a `default` not among them, a ValueError."""
    paths = [Path(p) for p in configured] or default_checkpoints(BUNDLED)  # BUNDLED: tests point it elsewhere
    if not paths:
        raise ValueError(f"no checkpoint configured and none bundled under {BUNDLED}; {TRAIN_HINT}")
    files = {}
    for path in paths:
        weights = resolve_checkpoint_path(path)
        if not weights.is_file():
            raise CheckpointError(
                f"{path}: no such checkpoint (a run directory holding model.safetensors, or a .safetensors file)"
            )
        name = model_name(weights)
        if files.get(name) == weights:
            raise ValueError(f"{path} is listed twice: name each checkpoint once")
        if name in files:
            raise ValueError(
                f"two checkpoints are both named {name!r} ({files[name]} and {weights}); rename a run directory"
            )
        files[name] = weights
    if default is None:
        return files
    if default not in files:
        raise ValueError(f"QUILL_DEFAULT_MODEL={default!r} is not served; choose one of {list(files)}")
    return {default: files.pop(default), **files}


# A model this large (parameters) gets every core for its engine by default; a smaller one every core but one.
# The server's process does work of its own for every token (SSE, JSON), so the more tokens/s a model makes, the
# more that work needs a core of its own: on 2 cores the bundled GPT (3.2M) served 32 streams at 7,800 tokens/s
# with 1 engine thread and 5,900 with 2, where a 6-layer GPT (10.8M) served 1 and 32 streams at 1.5x and 1.2x
# the tokens/s with 2 (docs/benchmarks-peers.md).
ALL_CORES_FROM = 5_000_000


def engine_threads(model):
    """The torch threads a model's engine gets unless QUILL_TORCH_THREADS says: see ALL_CORES_FROM."""
    cores = os.cpu_count() or 2
    return cores if sum(p.numel() for p in model.parameters()) >= ALL_CORES_FROM else max(1, cores - 1)


def engine_options(settings, supervision):
    """load_served_model's arguments that the service's settings give (all but the file, device, dtype and on_step);
    `supervision`: an engine process's on_restart and on_give_up (its timeout is a setting)."""
    return {
        "max_batch": settings.max_running,
        "threads": settings.torch_threads or None,
        "compiled": settings.compile,
        "process": settings.engine_process,
        "compile_folder": settings.compile_cache,
        "supervision": {"timeout": settings.engine_timeout, **supervision},
        "prefix_cache": settings.prefix_cache,
        "quantize": settings.quantize,
    }


def load_served_model(
    weights,
    device,
    max_batch,
    on_step,
    threads=None,
    compiled=False,
    dtype=torch.float32,
    process=False,
    compile_folder=None,
    supervision=None,
    prefix_cache=True,
    quantize=None,
):
    """`threads`: the engine's torch threads (None: engine_threads). `process`: run the engine in a child process
    of its own (EngineProcess), which alone holds the weights: the model here is then on the meta device, read from
    the checkpoint's header, and only describes it (config, type, parameter count, dtype); `supervision`: its
    timeout, on_restart and on_give_up (EngineProcess's arguments). `compile_folder`: where compiled decode steps
    are kept (model/compiled.py). `prefix_cache`: reuse the prefixes that cache rows hold (model/cache.py).
    `quantize`: "int8" stores a GPT's linear weights as int8 (model/quantize.py), in the engine's copy and in the
    model here (on the meta device, it says so on the model card); None: as `dtype`."""
    weights = Path(weights)
    model, tokenizer, meta = describe_checkpoint(weights) if process else load_checkpoint(weights, device=device)
    model.to(dtype)  # once, here: the engine's caches and steps take the weights' dtype (and the model card says it)
    name = model_name(weights)
    sha = file_sha256(weights)
    threads = threads or engine_threads(model)
    quantize_model(model, quantize)  # after engine_threads counted the parameters (int8 weights are buffers)
    if process:
        kept = {
            "compiled": compiled and isinstance(model, GPT),
            "compile_folder": compile_folder,
            "prefix_cache": prefix_cache,
            "quantize": quantize,
            **(supervision or {}),
        }
        context = model.config.context_size if isinstance(model, GPT) else None
        engine = EngineProcess(
            weights, device, dtype, max_batch, on_step=on_step, threads=threads, name=name, context=context, **kept
        )
    else:
        kept = {"compiled": compiled, "compile_folder": compile_folder, "weights": weights}  # compiled from weights
        engine = Engine(
            model, max_batch, on_step=on_step, threads=threads, prefix_cache=prefix_cache, tokenizer=tokenizer, **kept
        )
    return ServedModel(name, weights, model, tokenizer, meta, sha, engine)
