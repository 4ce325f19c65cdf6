"""The GPT's decode step compiled ahead of time (AOTInductor): one package per batch size, kept on disk.

torch.export traces the step (the model's own cached forward over a padded batch, reading the whole context,
masked; GPTCache) with the KV cache as inputs, which the step writes in place. AOTInductor compiles the trace
into a shared library: weights frozen in as constants, matrix products autotuned. No dynamo runs per token,
and the engine calls the package's loader directly, skipping its Python wrapper's pytree work (about 25 us a
token at batch 1).

Compiling takes seconds to minutes a batch size, so packages are kept in a folder (QUILL_COMPILE_CACHE;
default $XDG_CACHE_HOME/quill/compiled, else ~/.cache/quill/compiled), each named by a key of all that
shapes its code: the weights' bytes, the model's config, this module's and model/gpt.py's source, the batch
size, torch's version, and the machine it runs on (on a CPU: the processor's model and flags, since the
library is built for this one's, and torch's thread count, which its kernels bake in; on a GPU: its name and
compute capability). A package whose key matches is loaded in about a second; any change compiles anew.
"""

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from model import gpt
from model.gpt import GPT, KVCache

log = logging.getLogger("quill")


def default_folder():
    """Where compiled packages are kept unless QUILL_COMPILE_CACHE says: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quill" / "compiled"


class DecodeStep(nn.Module):
    """What is exported: one token for each of rows 0..n-1 of the cache storage (k, v: n_layer tensors of
    (n, nh, context_size + 1, hs), written in place), whose attention reads the first span.size(0) positions
    (masked past each row's length). The batch size is fixed; the span is a dynamic size, so that one
    package serves every length without reading the whole context. Next-token logits (n, V)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths, span, k, v):
        logits, _ = self.model(tokens, kv_cache=KVCache(k, v, lengths, span.size(0) - 1))
        return logits[:, -1]


def machine_identity(device):
    """What a compiled package is built for beyond its inputs: the GPU's name and compute capability, or the
    CPU's model and flags and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} sm{torch.cuda.get_device_capability(device)}"
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = " ".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    return f"{cpu or os.uname().machine} threads={torch.get_num_threads()}"


def weights_key(model: GPT):
    """A hash of the model's weights (their names, dtypes, shapes and bytes) and config, and of the code the
    step runs: the part of every package's key that all batch sizes share."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(asdict(model.config), sort_keys=True).encode())
    for source in (gpt.__file__, __file__):
        h.update(Path(source).read_bytes())
    h.update(torch.__version__.encode())
    return h


def writable_folder(folder):
    """`folder`, created if need be, when a file can be written there; else, after one warning, a temporary
    folder removed when the process exits (the packages then last one run)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        return folder
    except OSError as e:
        temporary = Path(tempfile.mkdtemp(prefix="quill-compiled-"))
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        log.warning("cannot keep compiled steps in %s (%s); using %s for this run", folder, e.strerror, temporary)
        return temporary


@contextlib.contextmanager
def quiet_compiler():
    """Inductor's autotuning prints a table of timings for every matrix product, and export warns about
    TypedStorage and torch.jit: a start-up log should say what is compiling, not that."""
    from torch._inductor import select_algorithm

    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method. is deprecated")
        stack.enter_context(torch._inductor.config.patch(max_autotune_report_choices_stats=False))
        old, select_algorithm.PRINT_AUTOTUNE = select_algorithm.PRINT_AUTOTUNE, False
        stack.callback(setattr, select_algorithm, "PRINT_AUTOTUNE", old)
        yield


class CompiledSteps:
    """The compiled decode step of `model` over the cache storage k and v (n_layer tensors each of max_batch
    rows, never reallocated: a batch of n rows reads views of their first n). build(sizes) compiles or loads
    one package per batch size; then steps(tokens, lengths, longest) runs the one for len(tokens) rows."""

    def __init__(self, model: GPT, k, v, folder=None):
        self.model, self.k, self.v = model, k, v
        self.folder = Path(folder) if folder else default_folder()
        self.views = {}  # batch size -> the cache's views that its step reads and writes
        # its first N elements tell a step to read N positions of the cache (a size, not values)
        self.span = torch.empty(model.config.context_size + 1, device=k[0].device)
        self.runs = {}  # batch size -> the package loader's boxed_run

    def build(self, sizes, on_built=None):
        """Load each batch size's package from the folder, or compile it there; raise if compiling fails.
        `on_built(sizes)` after each, with the batch sizes built so far."""
        folder = writable_folder(self.folder)
        device = next(self.model.parameters()).device
        shared = weights_key(self.model)
        shared.update(machine_identity(device).encode())
        for i, n in enumerate(sizes, 1):
            self.views[n] = [x[:n] for x in self.k] + [x[:n] for x in self.v]
            key = shared.copy()
            key.update(f"batch {n}".encode())
            path = folder / f"decode-{key.hexdigest()[:32]}.pt2"
            run = self._load(path, device) if path.exists() else None
            if run is None:
                log.info("compiling the decode step for batch size %d (%d of %d, kept in %s)", n, i, len(sizes), folder)
                self._compile(n, path, device)
                run = self._load(path, device, strict=True)
            else:
                log.info("loaded the compiled decode step for batch size %d (%d of %d)", n, i, len(sizes))
            self.runs[n] = run
            if on_built:
                on_built(list(self.runs))

    def _compile(self, n, path, device):
        tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
        lengths = torch.ones(n, dtype=torch.long, device=device)
        views = self.views[n]
        layers = len(views) // 2
        context = self.model.config.context_size
        args = (tokens, lengths, self.span[:2], views[:layers], views[layers:])
        # the span: 2 (rows of length 1) up to the whole context; export specializes sizes 0 and 1
        dynamic = (None, None, {0: torch.export.Dim("span", min=2, max=context)}, [None] * layers, [None] * layers)
        with quiet_compiler(), torch.no_grad():  # export traces with fake tensors: the cache is left as it is
            program = torch.export.export(DecodeStep(self.model), args, dynamic_shapes=dynamic)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            try:
                configs = {"freezing": True, "max_autotune": True}
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=configs)
                os.replace(partial, path)  # whole or not at all: another process may be loading it
            finally:
                partial.unlink(missing_ok=True)

    def _load(self, path, device, strict=False):
        """The package's boxed_run; None for a damaged one (not strict: it is compiled anew)."""
        try:
            index = device.index if device.type == "cuda" and device.index is not None else -1
            return torch._inductor.aoti_load_package(str(path), device_index=index).loader.boxed_run
        except Exception as e:
            if strict:
                raise
            log.warning("the compiled step %s could not be loaded (%s): compiling it anew", path.name, type(e).__name__)
            return None

    def __call__(self, tokens, lengths, longest):
        """tokens (n, 1), lengths (n,) for a built batch size n, where longest = max(lengths): the next-token
        logits (n, V), the cache updated in place."""
        n = len(tokens)
        return self.runs[n]([tokens, lengths, self.span[: longest + 1], *self.views[n]])[0]
