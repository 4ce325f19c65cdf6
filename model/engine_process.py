"""The engine in a process of its own, so that its Python and the server's event loop never wait on one
GIL (vLLM splits its API server from its engine core the same way), and supervised, so that a child that
dies or hangs is noticed and replaced without losing the requests it held.

EngineProcess has the Engine's interface as the server uses it (start, stop, submit, counts, generate,
down). The child loads the checkpoint itself and runs the same Engine, stepped in its main thread: between
steps it takes the submits and cancels that arrived on a pipe, and after each piece of work (a decode step,
a prefill group, a scoring window) it sends back, in one message, every event emitted meanwhile, each with
the time its request was admitted (`started_at`; perf_counter is one clock for every process of a machine).
Here a reader thread hands each event to its Request's `emit`, and a writer thread alone writes the pipe, so
no caller ever blocks on a child busy with a long step.

Supervision (a watchdog thread): the child is dead when its pipe closes or its process has exited, and hung
when it has sent nothing for `timeout` seconds while work (or a ping, sent when idle) waits on it. Either
way it is killed and a new child started, which serves in seconds (its compiled steps load in the background).
Every request not yet finished is sent to the new child with the tokens it has already delivered
(Request.resumed): it is prefilled again and goes on, and with counter-based sampling (model/sampling.py)
its text is the one it would have had. A request the child had begun at two deaths, with no progress between,
ends with an `engine_failed` error, so that one bad request cannot crash-loop the server; CRASH_LOOP deaths
within CRASH_WINDOW seconds and it gives up: every request ends with that error and `on_give_up` is told.
"""

import contextlib
import itertools
import logging
import multiprocessing.connection
import threading
import time
from collections import deque
from dataclasses import replace
from functools import partial

from model.cache import batch_buckets
from model.engine_child import STARTED, STEP, TICK, Child, server_logs
from model.request import Finished, Outcome, Request, Token, Tracked
from model.sampling import SamplingParams
from model.scoring import PromptLogprobs

log = logging.getLogger("quill")

# seconds without a word from a child that has work: hung (QUILL_ENGINE_TIMEOUT). The longest legitimate silence
# is one forward of a context (a prefill group, a scoring window, a slide): for GPT-2 medium's shape on 2 busy CPU
# cores 15 s (measured), so an estimated 70 s for GPT-2 XL's (4.4x the parameters); the bundled models take ms
TIMEOUT = 120.0
CRASH_LOOP, CRASH_WINDOW = 5, 60.0  # this many deaths within this many seconds: give up


class EngineProcess:
    """An Engine in a child process, supervised (see the module docstring): the weights at `weights` loaded
    there on `device` in `dtype`; `threads` torch threads for its steps; `on_step(batch size)` called here;
    `context`: the model's context size (a prompt is cut to what it reads before it is sent), None for the
    LSTM; `on_restart(kind, why)` after a death ("died") or a hang ("hung"); `on_give_up(why)` once it has
    given up restarting."""

    def __init__(
        self,
        weights,
        device,
        dtype,
        max_batch=32,
        on_step=None,
        threads=None,
        compiled=False,
        compile_folder=None,
        prefix_cache=True,
        quantize=None,
        *,
        name="model",
        context=None,
        timeout=TIMEOUT,
        on_restart=None,
        on_give_up=None,
    ):
        logs = server_logs(name)
        self.args = (str(weights), str(device), dtype, max_batch, threads, compiled, compile_folder, prefix_cache)
        self.args += (quantize, logs)
        # (batch sizes whose compiled step the child has loaded, those planned); None: it decodes eagerly only
        self.compiled = ([], batch_buckets(max_batch)) if compiled else None
        self.name, self.max_batch, self.context, self.timeout = name, max_batch, context, timeout
        self.on_step, self.on_restart, self.on_give_up = on_step, on_restart, on_give_up
        self.tracked = {}  # request id -> Tracked, until its Finished arrives
        self.ids = itertools.count()
        self.lock = threading.RLock()  # the tracked requests and the child: a listener may cancel from inside
        self.child = None
        self.down = "starting"  # why requests cannot be taken now; None while the child is up
        self.failed = None  # why it gave up, once it has
        self.deaths = deque()  # when the recent ones were
        self.heard = time.monotonic()  # when the child last said anything
        self.pinged = False
        self.stopping = False
        self.wake = threading.Event()
        self.settled = threading.Event()  # start() has returned or raised
        self.watchdog = None
        self.first_start = 0.0  # seconds the first child took to start

    # -- the server's side --

    def start(self):
        """Start the child and return once it has loaded and warmed up; raise RuntimeError if it could not."""
        begun = time.monotonic()
        try:
            self.child = self._spawn()
        finally:
            self.settled.set()
        self.first_start = time.monotonic() - begun
        with self.lock:  # and what was submitted meanwhile
            self.down, self.heard = None, time.monotonic()
            for rid in sorted(self.tracked):
                self._send_submit(rid)
        self.watchdog = threading.Thread(target=self._watch, name="quill-engine-watchdog", daemon=True)
        self.watchdog.start()

    def stop(self, timeout=30):
        """Tell the child to end its requests and exit; one that has not within `timeout` s is killed."""
        with self.lock:
            self.stopping, self.down = True, "engine stopped"
        self.wake.set()
        if self.child:  # a start under way in another thread sees `stopping`, kills its child and raises
            self.settled.wait()
        if self.watchdog:
            self.watchdog.join()  # a restart under way is abandoned; then nothing but this thread waits on a child
        child = self.child
        if child and self.failed is None:
            child.send("stop", None)
            since = time.monotonic()  # its sentinel, not its exit code: another thread's Process.start() reaps
            if not multiprocessing.connection.wait([child.proc.sentinel], timeout):  # any exited child it finds
                log.warning("the engine process did not stop within %.0f s; killing it", time.monotonic() - since)
            child.kill()
        self._fail_all(Finished("error", "engine stopped"))

    def submit(self, req):
        if not req.prompt:
            raise ValueError("prompt must hold at least one token")
        rid = next(self.ids)
        req.on_cancel = partial(self._cancel, rid)
        with self.lock:
            refused = self.failed or (self.stopping and "engine stopped")
            if not refused:
                if not self.tracked:  # the time without a word counts from the first work it is given
                    self.heard = time.monotonic()
                self.tracked[rid] = Tracked(req)
                if self.down is None:  # else it goes to the next child with the others
                    self._send_submit(rid)
        if refused:
            req.emit(Finished("error", refused, "engine_failed" if self.failed else None))

    def counts(self):
        """(active, waiting): all requests not yet finished, the first max_batch of them counted as active."""
        n = len(self.tracked)
        return min(n, self.max_batch), max(0, n - self.max_batch)

    def generate(self, prompt, max_new_tokens, **sampling):
        """Blocking helper, as Engine.generate: run one request to the end, return its ids."""
        outcome = Outcome()
        self.submit(Request(list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **sampling), outcome))
        outcome.done.wait()
        return outcome.ids()

    def compiled_sizes(self):
        """As Engine.compiled_sizes: (batch sizes built, those planned), or None without compiling."""
        return self.compiled

    def _send_submit(self, rid):
        t = self.tracked[rid]
        params, prompt = t.req.params, t.req.prompt
        if t.scored:
            params = replace(params, prompt_logprobs=None)
        if self.context and params.prompt_logprobs is None and params.repetition_penalty == 1.0:
            prompt = prompt[-self.context :]  # all the model reads of it (the penalty reads the whole)
        self.child.send("submit", rid, prompt, params, t.tokens)

    def _cancel(self, rid):
        with self.lock:
            if rid not in self.tracked:  # finished already
                return
            if self.down is None:
                return self.child.send("cancel", rid)
            req = self.tracked.pop(rid).req  # no child to tell: it ends here
        req.emit(Finished("cancelled"))

    # -- the reader thread: a child's messages --

    def _received(self, child, kind, events):
        with self.lock:
            if child is not self.child:  # a child being replaced: what it says now is lost with it
                return
            self.heard = time.monotonic()
            if kind == "pong":
                self.pinged = False
            if kind == "built":
                self.compiled = events
            if kind != "events":
                return self.wake.set() if kind == "gone" else None
            for rid, event, started_at in events:
                if rid == STEP:
                    if self.on_step:
                        self.on_step(event)
                    continue
                if rid == STARTED:
                    for t in filter(None, map(self.tracked.get, event)):
                        t.started = True
                    continue
                t = self.tracked.get(rid)
                if t is None:
                    continue
                if isinstance(event, Token):
                    t.tokens.append(event.id)
                    t.last = event.last
                elif isinstance(event, PromptLogprobs):
                    t.scored = True
                elif isinstance(event, Finished):
                    del self.tracked[rid]
                t.req.started_at = t.req.started_at or started_at  # for the server's queue time and tokens/s
                try:
                    t.req.emit(event)
                except Exception:  # a broken listener: its request leaves the engine, as in Engine._emit
                    t.req.cancel()

    # -- the watchdog --

    def _watch(self):
        try:
            while not self.stopping:
                self.wake.wait(TICK)
                self.wake.clear()
                if self.stopping:
                    return
                fault = self._fault()
                if fault and not self._restart(*fault):
                    return
                idle = not fault and not self.tracked and not self.pinged
                if idle and time.monotonic() - self.heard > self.timeout / 2:
                    self.pinged, self.heard = True, time.monotonic()  # is it still there? (a hang is then
                    self.child.send("ping", None)  # noticed before the next request comes)
        except Exception as e:  # the supervisor's own fault: give up, never leave the engine down unseen
            log.exception("model %s: the engine's watchdog failed", self.name)
            self._give_up(f"the engine's watchdog failed: {type(e).__name__}: {e}")

    def _fault(self):
        """("died", why) or ("hung", why) when the child is no more good; else None."""
        child = self.child
        if child.gone.is_set() or not child.proc.is_alive():
            child.proc.join(1)  # its pipe closes as it exits: give it a moment to be reaped
            return "died", child.exit_status() if child.proc.exitcode is not None else "closed its pipe"
        silent = time.monotonic() - self.heard
        if (self.tracked or self.pinged) and silent > self.timeout:
            waiting = "work waiting" if self.tracked else "a ping waiting"
            return "hung", f"sent nothing for {silent:.0f} s with {waiting} (QUILL_ENGINE_TIMEOUT {self.timeout:g})"
        return None

    def _restart(self, kind, why):
        """Replace the child; False once given up (or stopping)."""
        since = time.monotonic()
        log.error("model %s: the engine process %s; restarting it", self.name, why)
        with self.lock:
            self.down, old = f"the engine process {why}; restarting it", self.child
        old.kill()
        self._blame(why)
        for tries in itertools.count(1):  # a death, then each start that fails: each counts towards a crash loop
            if self.on_restart:
                self.on_restart(kind, why)
            self.deaths.append(time.monotonic())
            while self.deaths[0] < self.deaths[-1] - CRASH_WINDOW:
                self.deaths.popleft()
            if len(self.deaths) >= CRASH_LOOP:
                return self._give_up(f"the engine process failed {len(self.deaths)} times within {CRASH_WINDOW:g} s")
            if tries >= CRASH_LOOP:  # starts that each hang until the limit below are too slow to crowd the window
                return self._give_up(f"the engine process failed {tries} times in a row")
            try:  # a new child that hangs as it starts is a death too (the first start has no limit: it may compile).
                # A start is one long silence (importing torch, loading): it may take as long as thrice the first did
                # on a machine that has since got busy, whatever a short QUILL_ENGINE_TIMEOUT says of a step
                child = self._spawn(silence=max(self.timeout, 3 * self.first_start))
                break
            except Exception as e:  # RuntimeError from the child; OSError (no memory, no file descriptors) here
                if self.stopping:
                    return False
                kind, why = "died", str(e).strip().splitlines()[0]
                log.error("model %s: %s", self.name, why)  # the child's traceback, at debug level:
                log.debug("model %s: %s", self.name, e)
        with self.lock:
            self.child, self.down, self.heard, self.pinged = child, None, time.monotonic(), False
            cancelled = [self.tracked.pop(rid).req for rid in list(self.tracked) if self.tracked[rid].req.cancelled]
            for rid in sorted(self.tracked):
                self._send_submit(rid)
            resumed = len(self.tracked)
        for req in cancelled:  # their cancel went to the child that died: they end here
            with contextlib.suppress(Exception):
                req.emit(Finished("cancelled"))
        log.info(
            "model %s: engine process restarted in %.1f s, %d request%s resumed",
            self.name,
            time.monotonic() - since,
            resumed,
            "s" * (resumed != 1),
        )
        return True

    def _blame(self, why):
        """A request the child had begun at this death and at the last one it saw, with no progress between, ends:
        it may be the cause. One that had delivered all it asked for ends as it would have."""
        failed = []
        with self.lock:
            for rid, t in list(self.tracked.items()):
                full = t.req.max_new_tokens == len(t.tokens)  # else a last token completed its grammar: "stop"
                done = (t.last or full) and (t.scored or t.req.params.prompt_logprobs is None)
                if done or (t.started and t.progress_at_death == t.progress):
                    failed.append((self.tracked.pop(rid).req, done and ("length" if full else "stop")))
                t.progress_at_death, t.started = t.progress if t.started else None, False  # the next child says
        for req, done in failed:
            why_this = f"the engine process failed twice running this request: {why}"
            with contextlib.suppress(Exception):  # a broken listener: nothing more to tell it
                req.emit(Finished(done) if done else Finished("error", why_this, "engine_failed"))

    def _give_up(self, why):
        log.critical("model %s: %s; giving up (the server's /health now answers 503)", self.name, why)
        self.failed = self.down = why
        self._fail_all(Finished("error", why, "engine_failed"))
        if self.on_give_up:
            self.on_give_up(why)
        return False

    def _fail_all(self, end):
        with self.lock:
            reqs = [t.req for t in self.tracked.values()]
            self.tracked.clear()
        for req in reqs:
            with contextlib.suppress(Exception):  # a broken listener: nothing more to tell it
                req.emit(end)

    def _spawn(self, silence=None):
        child = Child(self.args, self._received)
        with self.lock:
            self.child = child  # its messages count from now
        child.start(lambda: self.stopping, silence)
        return child
