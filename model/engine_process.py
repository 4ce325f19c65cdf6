"""The engine in a process of its own, so that its Python and the server's event loop never wait on one
GIL (vLLM splits its API server from its engine core the same way).

EngineProcess has the Engine's interface as the server uses it (start, stop, submit, counts, generate).
The child loads the checkpoint itself and runs the same Engine, stepped in its main thread: between steps
it takes the submits and cancels that arrived on a pipe, and after each step it sends back, in one message,
every event the step emitted, each with the time its request was admitted (`started_at`; perf_counter is
one clock for every process of a machine). A reader thread here hands each event to its Request's `emit`.
"""

import contextlib
import itertools
import logging
import multiprocessing
import signal
import threading
import traceback
from functools import partial

import torch

from model.engine import Finished, Outcome, Request
from model.sampling import SamplingParams

log = logging.getLogger("quill")

STEP = -1  # the request id under which a message carries the decode step's batch size (for on_step)


def serve(conn, weights, device, dtype, max_batch, threads, compiled, compile_folder, logs):
    """The child process: load, warm up, say ("ready", None) (or ("failed", why)), then step until told to stop.
    `logs`: (level, formatter) of the server's log, so that the engine's lines read as the server's own."""
    from model import load_checkpoint
    from model.engine import Engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server handles it
    level, formatter = logs
    if formatter:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        logging.getLogger().addHandler(handler)
    log.setLevel(level)
    out, requests = [], {}
    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(weights, device=device)[0].to(dtype)
        on_step = lambda n: out.append((STEP, n, None))  # noqa: E731
        engine = Engine(model, max_batch, on_step=on_step, compiled=compiled, compile_folder=compile_folder)
        engine.warm_up()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", None))

    def emit(rid, event):
        req = requests.get(rid)
        out.append((rid, event, req and req.started_at))
        if isinstance(event, Finished):
            requests.pop(rid, None)

    def take_commands(block):
        """Submit and cancel what the pipe holds (waiting for the first if `block`); False once told to stop."""
        while conn.poll(None if block else 0):
            block = False
            try:
                command, rid, *args = conn.recv()
            except EOFError:  # the server is gone (killed): nothing to serve
                return False
            if command == "submit":
                requests[rid] = req = Request(args[0], args[1], partial(emit, rid))
                engine.submit(req)
            elif command == "cancel" and rid in requests:
                requests[rid].cancel()
            elif command == "stop":
                return False
        return True

    try:
        while take_commands(block=not (engine.active or engine.waiting)):
            engine.step()
            if out:
                conn.send(("events", out))
                out = []
        for req in engine.active + list(engine.waiting):
            req.emit(Finished("error", "engine stopped"))
        conn.send(("events", out))
    except (BrokenPipeError, ConnectionResetError):  # the server is gone (killed) while we stepped
        pass


def server_logs():
    """The level of the server's log, and the formatter of its first handler: when it is logging's own (as
    `python -m app` sets it up), which pickles; else None, and the child keeps logging's defaults."""
    handlers = logging.getLogger().handlers
    formatter = handlers[0].formatter if handlers else None
    return log.getEffectiveLevel(), formatter if type(formatter) is logging.Formatter else None


class EngineProcess:
    """An Engine in a child process (see the module docstring): the weights at `weights` loaded there on
    `device` in `dtype`; `threads` torch threads for its steps; `on_step(batch size)` called here."""

    def __init__(
        self, weights, device, dtype, max_batch=32, on_step=None, threads=None, compiled=False, compile_folder=None
    ):
        context = multiprocessing.get_context("spawn")  # not fork: this process has threads (torch's, ours)
        self.conn, child = context.Pipe()
        self.proc = context.Process(
            target=serve,
            args=(child, str(weights), str(device), dtype, max_batch, threads, compiled, compile_folder, server_logs()),
            name="quill-engine",
            daemon=True,
        )
        self.max_batch = max_batch
        self.on_step = on_step
        self.requests = {}  # request id -> Request, until its Finished arrives
        self.ids = itertools.count()
        self.lock = threading.Lock()  # one sender at a time on the pipe
        self.reader = None
        self.exited = None  # why the child is gone, once it is

    def start(self):
        """Start the child and return once it has loaded and warmed up; raise RuntimeError if it could not."""
        self.proc.start()
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            kind, detail = "failed", f"the engine process exited with code {self.proc.join() or self.proc.exitcode}"
        if kind != "ready":
            self.proc.join()
            raise RuntimeError(f"the engine process could not start: {detail}")
        self.reader = threading.Thread(target=self._read, name="quill-engine-reader", daemon=True)
        self.reader.start()

    def stop(self, timeout=30):
        """Tell the child to end its requests and exit; one that has not within `timeout` s is killed."""
        if self.exited is None:
            self._send("stop", None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("the engine process did not stop within %s s; killing it", timeout)
            self.proc.kill()
            self.proc.join()
        if self.reader:
            self.reader.join()

    def submit(self, req):
        if not req.prompt:
            raise ValueError("prompt must hold at least one token")
        rid = next(self.ids)
        req.on_cancel = partial(self._cancel, rid)
        self.requests[rid] = req
        if self.exited is not None or not self._send("submit", rid, list(req.prompt), req.params):
            self.requests.pop(rid, None)
            req.emit(Finished("error", self.exited or "the engine process has stopped"))

    def counts(self):
        """(active, waiting): all requests not yet finished, the first max_batch of them counted as active."""
        n = len(self.requests)
        return min(n, self.max_batch), max(0, n - self.max_batch)

    def generate(self, prompt, max_new_tokens, **sampling):
        """Blocking helper, as Engine.generate: run one request to the end, return its ids."""
        outcome = Outcome()
        self.submit(Request(list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **sampling), outcome))
        outcome.done.wait()
        return outcome.ids()

    def _cancel(self, rid):
        if rid in self.requests:  # not yet finished
            self._send("cancel", rid)

    def _send(self, *message):
        """Send a command; False when the child is gone."""
        try:
            with self.lock:
                self.conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def _read(self):
        while True:
            try:
                _, events = self.conn.recv()
            except (EOFError, OSError):
                break
            for rid, event, started_at in events:
                if rid == STEP:
                    if self.on_step:
                        self.on_step(event)
                    continue
                req = self.requests.get(rid)
                if req is None:
                    continue
                if isinstance(event, Finished):
                    del self.requests[rid]
                req.started_at = req.started_at or started_at  # for the server's queue time and tokens/s
                try:
                    req.emit(event)
                except Exception:  # a broken listener: its request leaves the engine, as in Engine._emit
                    req.cancel()
        self.proc.join(5)
        self.exited = f"the engine process exited (code {self.proc.exitcode})"
        for rid in list(self.requests):
            req = self.requests.pop(rid)
            with contextlib.suppress(Exception):  # a broken listener: nothing more to tell it
                req.emit(Finished("error", self.exited))
