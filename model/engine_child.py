"""The engine process's own side (serve, run in the child) and this process's handle on one (Child): the pipe
between them, read by one thread here and written by another. model/engine_process.py supervises them."""

import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
import traceback
from functools import partial

import torch

from model.request import Finished, Request

log = logging.getLogger("quill")

STEP = -1  # the request id under which a message carries the decode step's batch size (for on_step)
STARTED = -2  # ... and the ids of the requests the engine has begun (admitted to its batch or its scoring)
TICK = 0.25  # how often a waiting side looks again


def serve(conn, weights, device, dtype, max_batch, threads, compiled, compile_folder, prefix_cache, quantize, logs):
    """The child process: load, warm up, say ("ready", None) (or ("failed", why)), then step until told to stop,
    while its decode step compiles in the background (saying ("built", (batch sizes built, planned)) as each is
    loaded, or ("built", None) once compiling has failed). `logs`: (level, formatter, model name) of the server's
    log, so that the engine's lines read as the server's own, each naming its model."""
    from model import load_checkpoint
    from model.engine import Engine
    from model.quantize import quantize as quantize_model

    # Ctrl-C, or a SIGTERM to the process group (make serve, systemd), is the server's to handle: it drains, then
    # stops this process over the pipe; if the server dies, the pipe's end stops it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level, formatter, name = logs
    log.addFilter(lambda record: setattr(record, "msg", f"model {name}: {record.msg}") or True)
    if formatter:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        logging.getLogger().addHandler(handler)
    log.setLevel(level)
    out, requests = [], {}
    try:
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer, _ = load_checkpoint(weights, device=device)
        model = quantize_model(model.to(dtype), quantize)  # int8 linear weights (model/quantize.py), when asked
        on_step = lambda n: out.append((STEP, n, None))  # noqa: E731
        kept = {"compiled": compiled, "compile_folder": compile_folder, "weights": weights}
        kept |= {"prefix_cache": prefix_cache, "tokenizer": tokenizer}
        engine = Engine(model, max_batch, on_step=on_step, exit_on_device_error=True, **kept)
        engine.warm_up(background=True)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", None))

    announced = set()

    def flush():  # after each piece of work, even with nothing to say: the watchdog hears the child is alive
        started = [rid for rid, req in requests.items() if req.started_at and rid not in announced]
        if started:
            announced.update(started)
            out.append((STARTED, started, None))
        conn.send(("events", out[:]))
        out.clear()

    engine.on_progress = flush

    def emit(rid, event):
        req = requests.get(rid)
        out.append((rid, event, req and req.started_at))
        if isinstance(event, Finished):
            requests.pop(rid, None)
            announced.discard(rid)

    told = {"sizes": "nothing yet", "building": True}  # what the server last heard of the compile

    def take_commands(block):
        """Submit and cancel what the pipe holds (waiting for the first if `block`, and while a background compile
        runs, a TICK at most, to tell its progress); False once told to stop."""
        building = engine.cache.step is not None and engine.cache.step.building  # read first: then no size is missed
        if told["building"]:  # while it compiles, and once after: not a cost of every step for the server's life
            told["building"] = building
            if (sizes := engine.compiled_sizes()) != told["sizes"]:
                told["sizes"] = sizes
                conn.send(("built", sizes))
        while conn.poll((TICK if building else None) if block else 0):
            block = False
            try:
                command, rid, *args = conn.recv()
            except EOFError:  # the server is gone (killed): nothing to serve
                return False
            if command == "submit":
                prompt, params, resumed = args
                requests[rid] = req = Request(prompt, params, partial(emit, rid), resumed=resumed)
                engine.submit(req)
            elif command == "cancel" and rid in requests:
                requests[rid].cancel()
            elif command == "ping":
                conn.send(("pong", None))
            elif command == "stop":
                return False
        return True

    try:
        while take_commands(block=not engine.busy()):
            engine.step()
            if out:
                flush()
        for req in engine.active + list(engine.waiting) + [r for job in engine.scoring for r in job.reqs]:
            req.emit(Finished("error", "engine stopped"))
        flush()
    except (BrokenPipeError, ConnectionResetError):  # the server is gone (killed) while we stepped
        pass
    finally:
        engine.cache.stop()  # a background compile's builder


def server_logs(name):
    """The level of the server's log, and the formatter of its first handler: when it is logging's own (as
    `python -m app` sets it up), which pickles; else None, and the child keeps logging's defaults. And the name
    of the model, which begins each line."""
    handlers = logging.getLogger().handlers
    formatter = handlers[0].formatter if handlers else None
    return log.getEffectiveLevel(), formatter if type(formatter) is logging.Formatter else None, name


def unguarded_script():
    """Why a child may have ended before its own code ran, when this process runs a script (python script.py, not
    python -m): spawn runs the script again in the child, and one that starts the server there unguarded fails."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return ""
    return (
        f". The engine process runs {path} again as it starts: if that script starts the server (TestClient(app), "
        'uvicorn.run(app)), put that code under `if __name__ == "__main__":` (the engine process\'s own error is above)'
    )


class Child:
    """One engine process, and the two threads of this process that talk to it."""

    def __init__(self, args, on_message):
        context = multiprocessing.get_context("spawn")  # not fork: this process has threads (torch's, ours)
        self.conn, theirs = context.Pipe()
        self.proc = context.Process(target=serve, args=(theirs, *args), name="quill-engine", daemon=True)
        self.theirs, self.on_message = theirs, on_message
        self.outbox = queue.SimpleQueue()
        self.gone = threading.Event()  # set once the pipe has closed
        self.threads = []

    def start(self, stopping, silence=None):
        """Start the process; return once it has loaded and warmed up; RuntimeError if it could not, if
        `stopping()` turns true meanwhile, or if it says nothing for `silence` seconds."""
        self.proc.start()
        self.theirs.close()  # the child's end is the child's: its death then closes the pipe here
        begun = time.monotonic()
        while not self.conn.poll(TICK):
            hung = silence is not None and time.monotonic() - begun > silence
            if stopping() or hung or not self.proc.is_alive():
                why = "was stopped" if stopping() else self.exit_status() + unguarded_script()
                why = f"sent nothing for {silence:g} s while starting" if hung else why
                self.kill()
                raise RuntimeError(f"the engine process {why}")
        try:
            kind, detail = self.conn.recv()
        except EOFError:  # gone before a word: not even its own start-up ran
            self.proc.join(5)
            kind, detail = "failed", f"the engine process {self.exit_status()}{unguarded_script()}"
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"the engine process could not start: {detail}")
        for target in (self._read, self._write):
            self.threads.append(threading.Thread(target=target, name=f"quill-engine{target.__name__}", daemon=True))
            self.threads[-1].start()

    def send(self, *message):
        self.outbox.put(message)

    def exit_status(self):
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def kill(self):
        """Kill the process and reap it; the writer ends now, the reader at the pipe's end. Neither is waited
        for: a process the child started may hold the pipe open, and what they carry now is ignored."""
        self.proc.kill()
        self.proc.join(10)  # a process in uninterruptible sleep (a wedged driver) is left behind, not waited for
        self.outbox.put(None)

    def _read(self):
        while True:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            self.on_message(self, kind, payload)
        self.gone.set()
        self.on_message(self, "gone", None)

    def _write(self):
        while (message := self.outbox.get()) is not None:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader and the watchdog see to it
                break
