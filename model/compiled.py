"""The GPT's decode step compiled ahead of time (AOTInductor): one package per batch size, kept on disk, all
of them running on the engine's own weights.

torch.export traces the step (the model's own cached forward over a padded batch, reading the whole context,
masked; GPTCache) with the KV cache as inputs, which the step writes in place. AOTInductor compiles the trace
into a shared library without the weights: loading a package hands it the model's own tensors (user-managed
constants), so every batch size's package reads the one copy the engine holds. No dynamo runs per token, and
the engine calls the package's loader directly, skipping its Python wrapper's pytree work (about 25 us a token
at batch 1). Matrix products are not autotuned: autotuning packs a copy of each weight into every package (and
on CUDA tunes Triton kernels for minutes a batch size); without it a batch size compiles in about 12 s (the
bundled GPT on this 2-core machine, against 28 s) and a step runs 5-10% slower.

A server compiles in the background (build_in_background): it serves with the eager step at once while a
builder process (`python -m model.compiled`, niced) compiles each batch size that has no package yet, and the
engine switches to each package as it is loaded. Packages are kept in a folder (QUILL_COMPILE_CACHE; default
$XDG_CACHE_HOME/quill/compiled, else ~/.cache/quill/compiled), each named by a key of all that shapes its code:
the weights' bytes (int8 ones too: QUILL_QUANTIZE, model/quantize.py, which the builder applies as the engine
did), the model's config, the source of this module, model/gpt.py and model/quantize.py, the batch size, torch's
version, and the machine it runs on (on a CPU: the processor's model and flags, since the library is built for
this one's, and torch's thread count, which its kernels bake in; on a GPU: its name and compute capability). A
package whose key matches loads in about a second; any change compiles anew.
"""

import argparse
import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from model import gpt, quantize
from model.gpt import GPT, KVCache

log = logging.getLogger("quill")

SETTINGS = {"aot_inductor.package_constants_in_so": False}  # no weights in the package; no autotuning


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


def machine_identity(device, threads=None):
    """What a compiled package is built for beyond its inputs: the GPU's name and compute capability, or the
    CPU's model and flags and the torch thread count it runs with (default: this thread's)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} sm{torch.cuda.get_device_capability(device)}"
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = " ".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    return f"{cpu or os.uname().machine} threads={threads or torch.get_num_threads()}"


def weights_key(model: GPT):
    """A hash of the model's weights (their names, dtypes, shapes and bytes) and config, and of the code the
    step runs: the part of every package's key that all batch sizes share."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(asdict(model.config), sort_keys=True).encode())
    for source in (gpt.__file__, quantize.__file__, __file__):
        h.update(Path(source).read_bytes())
    h.update(torch.__version__.encode())
    return h


def package_paths(model: GPT, sizes, folder, threads=None):
    """{batch size: the file its package is kept in}."""
    device = next(model.parameters()).device
    shared = weights_key(model)
    shared.update(machine_identity(device, threads).encode())
    paths = {}
    for n in sizes:
        key = shared.copy()
        key.update(f"batch {n}".encode())
        paths[n] = Path(folder) / f"decode-{key.hexdigest()[:32]}.pt2"
    return paths


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


def missing_tools(device):
    """Why the step cannot be compiled here (no C++ compiler; on CUDA, no Python headers for Triton's launcher),
    or None."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # inductor raises its own error types for a compiler it cannot find
        return "no C++ compiler (g++, or $CXX) found"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if device.type == "cuda" and not headers.exists():
        return f"no Python headers ({headers}) for Triton's launcher"
    return None


@contextlib.contextmanager
def quiet_compiler():
    """Export warns about TypedStorage and torch.jit: a start-up log should say what is compiling, not that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method. is deprecated")
        warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated")
        yield


def compile_step(model: GPT, n, path):
    """Export the step for batch size n and compile it into the package at `path` (written whole, or not at
    all: another process may be loading it). Its cache inputs are never read (export traces with fake tensors),
    so they are allocated, not filled."""
    cfg, p = model.config, next(model.parameters())
    device, dtype = p.device, p.dtype
    shape = (n, cfg.n_head, cfg.context_size + 1, cfg.hidden_size // cfg.n_head)
    k, v = ([torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)] for _ in range(2))
    tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
    lengths = torch.ones(n, dtype=torch.long, device=device)
    # the span: 2 (rows of length 1) up to the whole context (export specializes sizes 0 and 1); the example is
    # mid-context, the size the generated code is tuned for
    span = torch.empty(max(2, cfg.context_size // 2), device=device)
    dynamic = (None, None, {0: torch.export.Dim("span", min=2, max=cfg.context_size)}, [None] * len(k), [None] * len(v))
    with quiet_compiler(), torch.no_grad():
        program = torch.export.export(DecodeStep(model), (tokens, lengths, span, k, v), dynamic_shapes=dynamic)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=SETTINGS)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class CompiledSteps:
    """The compiled decode steps of `model` over the cache storage k and v (n_layer tensors each of max_batch
    rows, never reallocated: a batch of n rows reads views of their first n). build(sizes) loads or compiles
    one package per batch size here and now; build_in_background(sizes) does it while the engine serves, from
    `weights` (the checkpoint the model was loaded from), for a builder process to load. Then
    `runs` holds each size built so far, and calling this with (tokens, lengths, longest) runs len(tokens)'s."""

    def __init__(self, model: GPT, k, v, folder=None, weights=None):
        self.model, self.k, self.v, self.weights = model, k, v, weights
        self.folder = Path(folder) if folder else default_folder()
        self.device = next(model.parameters()).device
        # its first N elements tell a step to read N positions of the cache (a size, not values)
        self.span = torch.empty(model.config.context_size + 1, device=self.device)
        self.runs = {}  # batch size -> the package loader's boxed_run, with the cache's views it reads
        self.failed = None  # why compiling failed, once it has: the engine then decodes eagerly
        self.builder = None  # the builder process, while it runs
        self.building = False

    def build(self, sizes, on_built=None):
        """Load each batch size's package from the folder, or compile it there; raise if compiling fails.
        `on_built(sizes)` after each, with the batch sizes built so far."""
        paths = package_paths(self.model, sizes, writable_folder(self.folder))
        for i, (n, path) in enumerate(paths.items(), 1):
            if path.exists() and self._load(n, path):
                log.info("loaded the compiled decode step for batch size %d (%d of %d)", n, i, len(sizes))
            else:
                where = path.parent
                log.info("compiling the decode step for batch size %d (%d of %d, kept in %s)", n, i, len(sizes), where)
                compile_step(self.model, n, path)
                self._load(n, path, strict=True)
            if on_built:
                on_built(sorted(self.runs))

    def build_in_background(self, sizes, threads, on_built=None):
        """As build, in a thread of its own, compiling in a builder process (a step compiled in this one would
        hold its GIL for seconds at a time); return at once. The engine meanwhile decodes eagerly."""
        if not self.weights:
            return self.fail("no checkpoint file to compile from")
        self.building = True
        args = (sizes, threads, on_built)
        threading.Thread(target=self._background, args=args, name="quill-compile", daemon=True).start()

    def stop(self):
        """End a background build: its builder is killed (what it had written whole is kept)."""
        self.building = False
        with contextlib.suppress(Exception):
            self.builder.kill()

    def _background(self, sizes, threads, on_built):
        try:
            paths = package_paths(self.model, sizes, writable_folder(self.folder), threads)
            for n, path in paths.items():
                if path.exists() and self._load(n, path) and on_built:
                    on_built(sorted(self.runs))
            missing = [n for n in sizes if n not in self.runs]
            if not missing:
                log.info("loaded the compiled decode step for batch sizes %s", ", ".join(map(str, sizes)))
            elif self.building:  # not stopped meanwhile
                self._build(missing, paths, threads, on_built)
        except Exception as e:  # inductor's messages run to many lines: the first says what failed
            self.fail(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        finally:
            self.building = False

    def _build(self, sizes, paths, threads, on_built):
        """Run the builder for `sizes`, loading each package it reports."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        # niced from its first instruction (importing torch takes seconds of CPU): serving comes first
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        command = [*nice, sys.executable, "-m", "model.compiled", str(self.weights), "--device", str(self.device)]
        command += ["--dtype", dtype, "--threads", str(threads), "--folder", str(paths[sizes[0]].parent)]
        command += ["--sizes", ",".join(map(str, sizes)), "--child"]
        command += ["--quantize", quantize.quantized(self.model) or "none"]  # the weights as the engine's
        root = str(Path(__file__).resolve().parent.parent)  # where `model` is imported from, wherever the cwd
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        log.info("compiling the decode step for batch sizes %s in the background", ", ".join(map(str, sizes)))
        with tempfile.TemporaryFile("w+") as errors:  # inductor's warnings: read only if it fails
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": errors}
            self.builder = subprocess.Popen(command, text=True, env=env, **pipes)
            last = ""
            for line in self.builder.stdout:  # "built N", or the failure's first line
                last = line.strip() or last
                word, _, n = last.partition(" ")
                if word == "built" and self.building:
                    self._load(int(n), paths[int(n)], strict=True)
                    if on_built:
                        on_built(sorted(self.runs))
            code = self.builder.wait()
            if code and self.building:
                errors.seek(0)
                log.debug("the builder's output: %s", errors.read()[-4000:])
                return self.fail(last if not last.startswith("built") else f"the builder exited with code {code}")
        if self.building:
            log.info("compiled the decode step for batch sizes %s", ", ".join(map(str, sizes)))

    def fail(self, why):
        self.failed = why
        log.warning("compiling the decode step failed, decoding without it: %s", why)

    def _load(self, n, path, strict=False):
        """Load the package for batch size n, on the model's own weights, into `runs`; False for a damaged one
        (not strict: it is compiled anew)."""
        try:
            index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
            # torch's C++ loader itself: aoti_load_package's Python wrapper imports inductor (70 MB resident)
            package = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
            weights = {f"model.{name}": t.detach() for name, t in self.model.state_dict(keep_vars=True).items()}
            constants = {name: weights[name] for name in package.get_constant_fqns()}
            # user-managed: the package reads these tensors where they are (the model holds them), not a copy
            package.load_constants(constants, False, True, True)  # (inactive buffer, check every one, user-managed)
        except Exception as e:
            if strict:
                raise
            log.warning("the compiled step %s could not be loaded (%s): compiling it anew", path.name, type(e).__name__)
            path.unlink(missing_ok=True)
            return False
        views = [x[:n] for x in self.k] + [x[:n] for x in self.v]
        self.runs[n] = (package.boxed_run, views)
        return True

    def __call__(self, tokens, lengths, longest):
        """tokens (n, 1), lengths (n,) for a built batch size n, where longest = max(lengths): the next-token
        logits (n, V), the cache updated in place."""
        run, views = self.runs[len(tokens)]
        return run([tokens, lengths, self.span[: longest + 1], *views])[0]


def main(argv=None):
    """The builder (CompiledSteps.build_in_background): compile the packages `weights` lacks, saying "built N"
    for each; the failure's first line and exit 1 if one fails. It ends when the process that started it does
    (its stdin closes)."""
    ap = argparse.ArgumentParser(description="Compile a checkpoint's decode step for each batch size.")
    ap.add_argument("weights")
    ap.add_argument("--sizes", required=True, help="batch sizes, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, required=True, help="the torch threads the engine decodes with")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--quantize", type=quantize.check, default=None, help="int8: as the engine's (model/quantize.py)")
    ap.add_argument("--child", action="store_true", help="end when stdin closes; ignore SIGINT and SIGTERM")
    args = ap.parse_args(argv)
    if args.child:  # an engine's builder: its parent's to stop, by closing stdin
        threading.Thread(target=lambda: sys.stdin.read() or os._exit(0), daemon=True).start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a SIGTERM to the process group
            signal.signal(sig, signal.SIG_IGN)
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    torch._inductor.config.compile_threads = 1  # no pool of compile workers (a process, and torch, each)
    try:
        if why := missing_tools(torch.device(args.device)):
            print(why, flush=True)
            return 1
        model = load_checkpoint(args.weights, device=args.device)[0].to(getattr(torch, args.dtype))
        quantize.quantize(model, args.quantize)
        sizes = [int(n) for n in args.sizes.split(",")]
        folder = writable_folder(args.folder or default_folder())
        for n, path in package_paths(model, sizes, folder, args.threads).items():
            if not path.exists():
                compile_step(model, n, path)
            print(f"built {n}", flush=True)
    except Exception as e:  # its first line, for the engine's log
        print(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
