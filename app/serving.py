"""Turns a request into engine work and the engine's tokens into text events. Knows no HTTP."""
import asyncio
import hashlib
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.errors import APIError
from app.protocol import MAX_SEED
from app.textstream import TextStream
from model import load_checkpoint
from model.engine import Engine, Request

BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints"
TRAIN_HINT = ("train one with: python -m train --data ../shared/data/tinyshakespeare.txt "
              "--out checkpoints/shakespeare-gpt --preset cpu (or see the README)")


@dataclass
class Params:
    prompt: str
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str


class GenerationFailed(Exception):
    """The engine ended a generation with an error (its batch failed, or the server is stopping)."""


@dataclass
class Job:
    """An admitted request: queued in its engine, its events arriving on `events`."""
    req: Request
    events: asyncio.Queue
    seed: int


@dataclass
class ServedModel:
    name: str
    path: Path
    model: object
    tokenizer: object
    meta: dict
    sha256: str
    engine: Engine


def default_checkpoints():
    found = sorted(p.parent for p in BUNDLED.glob("*/model.safetensors"))
    # the GPT first: it is the project's main model, so it is the default
    return sorted(found, key=lambda p: ("gpt" not in p.name, p.name))


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_served_model(path, device, max_batch, on_step, threads=None):
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    model, tokenizer, meta = load_checkpoint(weights, device=device)
    name = weights.parent.name if weights.name == "model.safetensors" else weights.stem
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    engine = Engine(model, max_batch, on_step=on_step, threads=threads)
    return ServedModel(name, weights, model, tokenizer, meta, sha, engine)


class EventRelay:
    """Carries engine events into the event loop with one wake-up per burst instead of one per
    token: each call_soon_threadsafe writes the loop's self-pipe, and at 32 streams those
    syscalls and wake-ups, not the model, limited the tokens/s."""

    def __init__(self, loop):
        self.loop = loop
        self.pending = deque()
        self.scheduled = False

    def send(self, queue, event):  # engine thread
        self.pending.append((queue, (event, time.perf_counter())))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: the engine's emit cancels the request
                self.scheduled = False
                raise

    def _deliver(self):  # event loop; the flag is cleared first, so a send racing with us schedules anew
        self.scheduled = False
        while self.pending:
            queue, item = self.pending.popleft()
            queue.put_nowait(item)


class Service:
    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.models = {}
        self.ready = False
        self.draining = False
        self.relay = None

    def load(self):
        paths = self.settings.checkpoints or default_checkpoints()
        if not paths:
            raise SystemExit(f"no checkpoint configured and none bundled under {BUNDLED}; {TRAIN_HINT}")
        device = pick_device(self.settings.device)
        for p in paths:
            served = load_served_model(p, device, self.settings.max_running, self.metrics.batch_size.observe,
                                       self.settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))
            if served.name in self.models:
                raise SystemExit(f"two checkpoints are both named {served.name!r}; rename a run directory")
            self.models[served.name] = served
        self.metrics.track_engines([m.engine for m in self.models.values()])

    def start(self):
        for served in self.models.values():
            served.engine.start()
            served.engine.generate([0], 2, temperature=0.0)  # warm-up: one prefill and one decode step
        self.ready = True

    def stop(self):
        self.ready = False
        for served in self.models.values():
            served.engine.stop()

    def in_flight(self):
        """Generations running or queued, in every engine (admitted requests are queued at once)."""
        return sum(sum(m.engine.counts()) for m in self.models.values())

    def get(self, name):
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(404, f"model {name!r} is not served; choose one of {sorted(self.models)}",
                           param="model", type="not_found_error")
        return self.models[name]

    def admit(self, served, params):
        """Everything that can refuse a request; then queue it, and return its Job."""
        if self.draining or not self.ready:
            raise APIError(503, "the server is shutting down" if self.draining else "the server is starting",
                           type="unavailable", headers={"Retry-After": "5"})
        try:
            ids = served.tokenizer.encode(params.prompt)
        except ValueError as e:
            raise APIError(422, f"prompt: {e}", param="prompt") from None
        running, queued = served.engine.counts()
        if running + queued >= self.settings.max_running + self.settings.max_queued:
            raise APIError(429, f"model {served.name!r} is at capacity ({running} running, {queued} queued); "
                           "retry shortly", type="rate_limit_error", headers={"Retry-After": "1"})
        # Queued now, not when the response starts streaming: requests that arrive together must
        # each see the ones admitted before them, or a burst would slip past the limit.
        loop = asyncio.get_running_loop()
        if self.relay is None or self.relay.loop is not loop:
            self.relay = EventRelay(loop)
        events = asyncio.Queue()
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        req = Request(ids, params.max_new_tokens,
                      emit=lambda ev: self.relay.send(events, ev),
                      temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
        served.engine.submit(req)
        return Job(req, events, seed)

    async def generate(self, served, params, job):
        """Yield TokenEvents, then one final dict; raise GenerationFailed if the engine fails."""
        req, events, seed, ids = job.req, job.events, job.seed, job.req.prompt
        text = TextStream(served.tokenizer, params.stop)
        first = last = None
        index = 0
        try:
            while True:
                (kind, value), at = await events.get()
                if kind == "finish":
                    break
                if first is None:
                    first = at
                    self.metrics.ttft.observe(at - req.submitted_at)
                else:
                    self.metrics.token_latency.observe(at - last)
                last = at
                self.metrics.tokens.labels(served.name).inc()
                delta = text.push(value)
                if index + 1 == params.max_new_tokens:  # the last token: release what is held back
                    delta += text.flush()
                yield TokenEvent(index, value, delta)
                index += 1
                if text.stopped:
                    req.cancel()
                    value = "stop"
                    break
            if value != "stop" and value != "length":
                raise GenerationFailed(value.removeprefix("error: "))
            done = time.perf_counter()
            started = req.started_at or done
            yield {
                "finish_reason": "stop" if value == "stop" else "length",
                "text": text.text,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": index,
                          "total_tokens": len(ids) + index},
                "timings": {"queue_s": round(started - req.submitted_at, 6),
                            "time_to_first_token_s": round((first or done) - req.submitted_at, 6),
                            "total_s": round(done - req.submitted_at, 6),
                            "tokens_per_s": round(index / max(done - started, 1e-9), 2)},
                "seed": seed,
                "model": served.name,
                "checkpoint_sha256": served.sha256,
            }
        finally:
            req.cancel()  # the client left, a stop string matched, or we are done: free the slot

    async def drain(self, timeout):
        """Stop admitting; wait for streams in flight, up to `timeout`; then end the rest."""
        self.draining = True
        self.ready = False
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for served in self.models.values():
            await asyncio.to_thread(served.engine.stop)  # the rest get ("finish", "error: engine stopped")
