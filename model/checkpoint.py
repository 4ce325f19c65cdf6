"""Checkpoint I/O: safetensors only, atomic writes, clear errors for anything else.

A checkpoint is one `.safetensors` file whose header metadata holds, as JSON under the key
"quill", everything needed to rebuild the model: its type and config, the tokenizer, and
how it was trained. One file means one atomic write: there is no sidecar to fall out of step.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.overrides import TorchFunctionMode

from model.gpt import GPT
from model.lstm import LSTM
from model.tokenizer import tokenizer_from_dict

WEIGHTS_NAME = "model.safetensors"  # a run directory's best weights
BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints"  # the trained runs the repository ships
BUNDLED_DEFAULT = "shakespeare-gpt"  # the run in BUNDLED that is served as the default model
META_KEY = "quill"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are kilobytes; refuse before allocating
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with the reason in words."""


def code_version():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file beside `path` for the block to write; fsynced and renamed over `path` when the
    block ends, removed if it fails: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def file_sha256(path):
    """A file's sha256, read a megabyte at a time (a large checkpoint is not held twice in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_stale_temp_files(directory):
    """Temporary files left by a process killed mid-save; safe to delete when no save runs."""
    removed = glob.glob(os.path.join(directory, TMP_PREFIX + "*"))
    for p in removed:
        os.unlink(p)
    return removed


def write_safetensors(path, tensors, meta):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={META_KEY: json.dumps(meta)}))


def _check_safetensors_file(path):
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a '{path.suffix}' file: weights are only loaded from safetensors, never unpickled"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length, whose first byte can be 0x80 too (a length
    # of 128 + 256k); only a file that is not plausibly safetensors is called a pickle.
    header_len = struct.unpack("<Q", head[:8])[0] if size >= 8 else None
    plausible = header_len is not None and header_len <= MAX_HEADER_BYTES and head[8:9] == b"{"
    if not plausible and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: this is a pickle / torch.save file, not safetensors; refused (it was not unpickled)"
        )
    if size < 8:
        raise CheckpointError(f"{path}: truncated: {size} bytes is too short for a safetensors file")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path}: corrupted or truncated: header claims {header_len} bytes but the file has {size}"
        )
    if head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)")


def read_safetensors(path, shapes_only=False):
    """Return (tensors, meta) from a file written by write_safetensors, or raise CheckpointError. `shapes_only`:
    the tensors are float32 ones on the meta device, of the header's names and shapes: nothing is read or held."""
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
            names = f.keys()  # safe_open has keys(), not iteration
            if shapes_only:
                tensors = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}
            else:
                tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # the library raises several types for a damaged file
        raise CheckpointError(f"{path}: corrupted safetensors file: {e}") from None
    if raw_meta is None:
        raise CheckpointError(f"{path}: no '{META_KEY}' metadata: not a Quill checkpoint")
    try:
        return tensors, json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {e}") from None


def build_model(model_type, config):
    if model_type == "gpt":
        return GPT(**config)
    if model_type == "lstm":
        return LSTM(**config)
    raise CheckpointError(f"unknown model type {model_type!r}")


def model_tensors(model):
    """The state dict without the second name of the tied matrix."""
    sd = model.state_dict()
    if isinstance(model, GPT):
        sd.pop("lm_head.weight")
    return sd


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's functions do nothing: for a module built on the meta device, which has no values to fill, and
    where normal_ is a Python reference op whose first call imports torch._dynamo and sympy (70 MB here, seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # each returns the tensor it fills
        return func(*args, **kwargs)


def load_model_tensors(model, tensors, where, assign=False):
    """Copy `tensors` into `model`'s parameters, or raise CheckpointError if their names or shapes disagree with it.
    `assign`: the tensors become the parameters (cast to their dtype), for a model built on the meta device, so
    that the weights are held once and never copied over a random initialisation."""
    if assign:
        own = model.state_dict()
        tensors = {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=assign)
    except RuntimeError as e:  # shapes that disagree with the config
        raise CheckpointError(f"{where}: weights do not match the config: {str(e)[:500]}") from None
    missing = [k for k in missing if not (isinstance(model, GPT) and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if isinstance(model, GPT):
        model.lm_head.weight = model.tok_emb.weight  # assign gave tok_emb a new matrix: tie lm_head to it again


def save_checkpoint(path, model, tokenizer, meta):
    """Write the model and its tokenizer; `meta` (JSON-able) says how it was trained."""
    model_type = "gpt" if isinstance(model, GPT) else "lstm"
    config = dataclasses.asdict(model.config)
    full = {**meta, "model_type": model_type, "config": config, "tokenizer": tokenizer.to_dict()}
    write_safetensors(path, model_tensors(model), full)


def model_name(weights):
    """A run directory's name, or a loose .safetensors file's stem: what the server and exports call it."""
    weights = Path(weights)
    return weights.parent.name if weights.name == WEIGHTS_NAME else weights.stem


def resolve_checkpoint_path(path):
    """The weights file that `path` names: a run directory's model.safetensors, or the file itself."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def default_checkpoints(root=None):
    """The run directories under `root` (checkpoints/ by default): the bundled GPT first, as it is the default
    model, then the others by name. A run a user trains into checkpoints/ is among the others, whatever its name."""
    found = sorted(p.parent for p in Path(root or BUNDLED).glob(f"*/{WEIGHTS_NAME}"))
    return sorted(found, key=lambda p: p.name != BUNDLED_DEFAULT)  # a stable sort: the others stay by name


def _checked_model(path, shapes_only):
    """(model, tokenizer, metadata) from the file, each checked against the others; the model is built on the meta
    device and given the file's tensors (or, with `shapes_only`, meta tensors of their shapes)."""
    tensors, meta = read_safetensors(path, shapes_only)
    for key in ("model_type", "config", "tokenizer"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}'")
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        with torch.device("meta"), _SkipInit():  # no random initialisation to allocate, then overwrite
            model = build_model(meta["model_type"], meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad metadata: {e}") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {model.config.vocab_size}"
        )
    load_model_tensors(model, tensors, path, assign=True)
    return model.eval(), tokenizer, meta


def load_checkpoint(path, device="cpu"):
    """Load (model in eval mode, tokenizer, metadata) from a run directory or a .safetensors file. On the CPU, in the
    file's dtype, the parameters are the file's own tensors, which safetensors maps from it copy-on-write: one copy,
    pages shared with the page cache. A file replaced by a rename (as atomic_path does) leaves them be; a model in
    use must not have its file overwritten in place."""
    model, tokenizer, meta = _checked_model(resolve_checkpoint_path(path), shapes_only=False)
    return model.to(device), tokenizer, meta


def describe_checkpoint(path):
    """load_checkpoint's (model, tokenizer, metadata), checked as it checks them, but from the file's header alone:
    the model is on the meta device, so its config, type and parameter count hold no weights in memory."""
    return _checked_model(resolve_checkpoint_path(path), shapes_only=True)
