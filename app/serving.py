"""Turns a request into engine work and the engine's tokens into text events. Knows no HTTP."""

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

from app import constraints
from app.errors import APIError
from app.logprobs import TokenLogprob, prompt_logprobs, scored
from app.protocol import choice_seeds, prompt_ids
from app.registry import checkpoint_files, engine_options, load_served_model
from app.relay import EventRelay
from app.textstream import TextStream
from model.device import pick_device, pick_dtype
from model.engine import Finished, Request
from model.scoring import PromptLogprobs

log = logging.getLogger("quill")


@dataclass
class TokenEvent:
    index: int
    id: int
    text: str  # safe to show: held-back text (a possible stop string, an unfinished character) comes later
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass
class PromptEvent:
    tokens: list  # the prompt's TokenLogprobs (echo with logprobs), before any TokenEvent


@dataclass
class Done:
    """The end of a generation that finished (not one that failed: that raises GenerationFailed)."""

    finish_reason: str  # "length" or "stop"
    text: str
    usage: dict
    timings: dict
    seed: int
    model: str
    checkpoint_sha256: str

    def to_dict(self):
        return asdict(self)


class GenerationFailed(APIError):
    """A generation ended before its end: its batch failed (500), or the server is shutting down (503).
    A stream already under way ends with an `error` event of this message, type and code."""

    def __init__(self, message, status=500, type="server_error", code=None, detail=None):
        retry = {"Retry-After": "5"} if status == 503 else None
        super().__init__(status, message, type=type, headers=retry, code=code, detail=detail)


SHUTTING_DOWN = "the server is shutting down"
# The engine's errors written for users; any other (no code) is an exception's text, which only the log sees.
USER_FACING = ("engine stopped", "the model's output held NaN")
FORMAT_FAILED = "the output format"  # model/grammar.py's: the request's format cannot be written (its fault: 400)


def shutdown_failure():
    return GenerationFailed(SHUTTING_DOWN, 503, "unavailable", code="server_shutdown")


def engine_failure(end: Finished):
    """What a client is told of a request the engine ended with an error: its words when the engine gave it a
    code or they are USER_FACING; else only that it failed (errors.client_message logs the text)."""
    if end.error and end.error.startswith(FORMAT_FAILED):
        return GenerationFailed(end.error, 400, "invalid_request_error", code="unsupported_format")
    if end.code or end.error is None or end.error.startswith(USER_FACING):
        return GenerationFailed(f"generation failed: {end.error or end.reason}", code=end.code)
    return GenerationFailed("the generation failed", detail=end.error)


@dataclass
class Job:
    """An admitted request: queued in its engine, its events arriving on `events`."""

    req: Request
    events: asyncio.Queue


class Service:
    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.models = {}
        self.ready = False
        self.draining = False
        self.drain_deadline = math.inf  # drain() lets streams run until then; stop_now() brings it forward
        self.ended = False  # the engines were stopped by the shutdown: what they end reads as one
        self.relay = None
        self.starting = None  # the model whose engine start() is starting
        self.failed = None  # why an engine gave up restarting: /health answers 503 from then on
        self.on_fatal = None  # called (from any thread) once one has: `python -m app` then drains and exits 1

    def load(self):
        """Load every checkpoint; a CheckpointError says which one cannot be served, and why."""
        files = checkpoint_files(self.settings.checkpoints, self.settings.default_model)  # the default first
        device = pick_device(self.settings.device)
        dtype = pick_dtype(self.settings.dtype, device)
        log.info(
            "loading %s on %s in %s%s",
            ", ".join(f"{name} ({path})" for name, path in files.items()),
            device,
            str(dtype).removeprefix("torch."),
            ", linear weights int8" if self.settings.quantize == "int8" else "",
        )
        for name, path in files.items():
            supervision = {"on_restart": partial(self._restarted, name), "on_give_up": partial(self._gave_up, name)}
            options = engine_options(self.settings, supervision)
            on_step = self.metrics.batch_size.observe
            self.models[name] = load_served_model(path, device, dtype=dtype, on_step=on_step, **options)
        self.metrics.track_engines([m.engine for m in self.models.values()])

    def start(self):
        """Start each model's engine in turn (it loads the model, compiles its decode steps when asked, and warms
        up), then turn ready; raise what stopped one from starting."""
        for served in self.models.values():
            self.starting = served.name
            served.engine.start()
            served.engine.generate([0], 2, temperature=0.0)  # waits for the warm-up: one prefill and decode step
        self.starting, self.ready = None, True
        log.info("serving %s", ", ".join(f"{m.name} ({m.path})" for m in self.models.values()))
        s, name = self.settings, self.get(None).name
        why = "QUILL_DEFAULT_MODEL" if s.default_model else "the first checkpoint named" if s.checkpoints else None
        why = why or ("the bundled GPT" if name == "shakespeare-gpt" else "the first run under checkpoints/")
        log.info("default model: %s (%s; requests that name none get it)", name, why)

    async def start_in_background(self):
        """start(), while the port already answers (/ready: 503 with each model's progress, status()); a model
        that cannot start is the server's end, as an engine that gives up is."""
        try:
            await asyncio.to_thread(self.start)
        except Exception as e:
            if not self.draining:  # not stopped while starting: failed
                self._gave_up(self.starting, f"could not start: {str(e).strip().splitlines()[0]}")

    def status(self):
        """Each model's start-up: waiting, starting or ready, and the batch sizes of its compiled decode step
        built so far and planned (when compiling)."""
        names = list(self.models)  # started in this order
        at = names.index(self.starting) if self.starting else len(names) if self.ready else 0
        states = {}
        for i, (name, served) in enumerate(self.models.items()):
            states[name] = {"state": "ready" if i < at else "starting" if i == at and self.starting else "waiting"}
            sizes = served.engine.compiled_sizes() if i <= at else None
            if sizes:
                states[name] |= {"compiled_batch_sizes": sizes[0], "batch_sizes": sizes[1]}
        return states

    def stop(self):
        self.ready = False
        for served in self.models.values():
            served.engine.stop()

    def _restarted(self, name, kind, why):  # an engine's watchdog thread
        self.metrics.engine_restarts.labels(name, kind).inc()

    def _gave_up(self, name, why):  # an engine's watchdog thread
        self.failed = f"model {name}: {why}"
        if self.on_fatal:
            self.on_fatal(self.failed)

    def unavailable(self):
        """Why a model cannot take requests now (its engine is restarting, or gave up); None when all can."""
        return next((f"model {m.name}: {m.engine.down}" for m in self.models.values() if m.engine.down), None)

    def in_flight(self):
        """Generations running or queued, in every engine (admitted requests are queued at once)."""
        return sum(sum(m.engine.counts()) for m in self.models.values())

    def get(self, name):
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} is not served; choose one of {sorted(self.models)}",
                param="model",
                type="not_found_error",
                code="model_not_found",
            )
        return self.models[name]

    def admit(self, served, prompts, choices, param="prompt"):
        """Everything that can refuse a request; then queue one engine request per prompt (a text, or token ids)
        and SamplingParams in `choices` (n > 1: several completions of each), prompt by prompt, and return
        their Jobs in that order."""
        if self.draining or not self.ready:
            raise APIError(
                503,
                SHUTTING_DOWN if self.draining else "the server is starting",
                type="unavailable",
                headers={"Retry-After": "5"},
                code="server_shutdown" if self.draining else "server_starting",
            )
        if served.engine.down:  # restarting (seconds), or given up (the server is about to exit)
            why = f"model {served.name!r} is unavailable: {served.engine.down}"
            raise APIError(503, why, "unavailable", headers={"Retry-After": "5"}, code="model_unavailable")
        try:
            work = [(ids, params) for ids in [prompt_ids(served.tokenizer, p) for p in prompts] for params in choices]
        except ValueError as e:
            raise APIError(422, f"{param}: {e} (model {served.name!r})", param=param) from None
        capacity = self.settings.max_running + self.settings.max_queued
        if len(work) > capacity:
            what, param = ("n", "n") if len(prompts) == 1 else (f"prompt: {len(prompts)} prompts x n", "prompt")
            raise APIError(400, f"{what}: {len(work)} choices, more than this server holds ({capacity})", param=param)
        running, queued = served.engine.counts()
        if running + queued + len(work) > capacity:
            raise APIError(
                429,
                f"model {served.name!r} is at capacity ({running} running, {queued} queued); retry shortly",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
                code="rate_limit_exceeded",
            )
        # Queued now, not when the response starts streaming: requests that arrive together must
        # each see the ones admitted before them, or a burst would slip past the limit.
        loop = asyncio.get_running_loop()
        if self.relay is None or self.relay.loop is not loop:
            self.relay = EventRelay(loop)
        jobs = []
        for ids, params in work:
            events = asyncio.Queue()
            req = Request(ids, params, emit=partial(self.relay.send, events))
            served.engine.submit(req)
            jobs.append(Job(req, events))
        return jobs

    async def generate(self, body):
        """Admit a request body (a GenerateRequest) now, raising what refuses it before any response starts;
        return its model and the async iterator of its TokenEvents and Done."""
        served = self.get(body.model)
        await constraints.check(served, body)
        (job,) = self.admit(served, [body.prompt], [body.to_sampling_params()])
        return served, self._events(served, job)

    async def generate_choices(self, body, prompt=None, stop=()):
        """Admit the n choices of an OpenAI request body (each of its prompts(), or the one given: a chat's
        rendered messages; `stop`: strings the chat format adds), one engine request each, seeded seed,
        seed + 1, ...; return the model and one event iterator per choice, prompt by prompt."""
        served = self.get(body.model)
        await constraints.check(served, body)
        extra = {"stop": stop} if stop else {}
        choices = [body.to_sampling_params(seed, **extra) for seed in choice_seeds(body)]
        if prompt is None:
            jobs = self.admit(served, body.prompts(), choices)
        else:  # a chat's: its faults are the messages'
            jobs = self.admit(served, [prompt], choices, param="messages")
        return served, [self._events(served, job) for job in jobs]

    async def _events(self, served, job):
        """Yield TokenEvents, then a Done; raise GenerationFailed if the engine fails."""
        req, events, params = job.req, job.events, job.req.params
        text = TextStream(served.tokenizer, params.stop)
        first = last = None
        index = 0
        tokens = self.metrics.tokens.labels(served.name)  # once: labels() is a locked look-up
        try:
            while True:
                event, at = await events.get()
                if isinstance(event, Finished):
                    break
                if isinstance(event, PromptLogprobs):
                    yield PromptEvent(prompt_logprobs(served.tokenizer, req.prompt, event))
                    continue
                if first is None:
                    first = at
                    self.metrics.ttft.observe(at - req.submitted_at)
                else:
                    self.metrics.token_latency.observe(at - last)
                last = at
                tokens.inc()
                logprob = None
                if params.logprobs is not None:  # the token's place: the characters decoded before it
                    offset = len(text.text) + len(text.held)
                    logprob = scored(served.tokenizer, event.id, event.logprob, event.top, offset)
                delta = text.push(event.id)
                if event.last:  # nothing follows: release what is held back
                    delta += text.flush()
                yield TokenEvent(index, event.id, delta, logprob)
                index += 1
                if text.stopped:
                    req.cancel()
                    event = Finished("stop")
                    break
            if event.reason not in ("length", "stop"):
                raise shutdown_failure() if self.ended else engine_failure(event)
            yield self._done(served, req, event.reason, text.text, index, first)
        finally:
            req.cancel()  # the client left, a stop string matched, or we are done: free the slot

    @staticmethod
    def _done(served, req, reason, text, generated, first):
        now = time.perf_counter()
        started = req.started_at or now
        prompt = len(req.prompt)
        return Done(
            finish_reason=reason,
            text=text,
            seed=req.params.seed,
            model=served.name,
            checkpoint_sha256=served.sha256,
            usage={"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
            timings={
                "queue_s": round(started - req.submitted_at, 6),
                "time_to_first_token_s": round((first or now) - req.submitted_at, 6),
                "total_s": round(now - req.submitted_at, 6),
                "tokens_per_s": round(generated / max(now - started, 1e-9), 2),
            },
        )

    def stop_admitting(self):
        """From now on /ready is 503 and new requests get 503 at once; streams in flight go on."""
        self.draining, self.ready = True, False

    async def drain(self, timeout):
        """Stop admitting; wait for streams in flight, up to `timeout` (or until stop_now); then end the rest,
        each with a server_shutdown error."""
        self.stop_admitting()
        self.drain_deadline = min(self.drain_deadline, time.monotonic() + timeout)
        while self.in_flight() and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(0.05)
        self.ended = True
        for served in self.models.values():
            await asyncio.to_thread(served.engine.stop)  # the rest get Finished("error", "engine stopped")

    def stop_now(self):
        """End the drain at once (a second Ctrl-C): streams in flight end with a server_shutdown error."""
        self.drain_deadline = 0
