"""A generation request as an engine takes it, and the events it sends back: a Token per generated token, then
one Finished (and, before them, the prompt's PromptLogprobs when asked: model/scoring.py)."""

import threading
import time
from dataclasses import dataclass, field

from model.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class Token:
    id: int
    last: bool = False  # its max_new_tokens-th token, or the one that completes its grammar: a Finished follows
    logprob: float | None = None  # with params.logprobs: the model's log-probability of this token
    top: tuple = ()  # and its params.logprobs likeliest tokens there, ((id, logprob), ...)


@dataclass(frozen=True)
class Finished:
    reason: str  # "length", "stop" (a grammar complete: model/grammar.py), "cancelled" or "error"
    error: str | None = None  # what failed, when reason is "error"
    code: str | None = None  # and, where a client may act on it, its kind ("engine_failed")


@dataclass
class Request:
    """One generation. `emit(event)` is called from the engine thread with a Token per generated
    token, then one Finished."""

    prompt: list
    params: SamplingParams
    emit: callable
    cancelled: bool = False
    error: str | None = None  # set when its own work failed (its prefill): it leaves with this error
    tokens: list = field(default_factory=list)  # prompt + generated, the sliding window's source
    generated: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float = None
    sampler: Sampler = None  # made when admitted: the draws' place and the ids seen
    on_cancel: callable = None  # called by cancel(): an engine in another process is told there
    # tokens it generated in an engine that has since been restarted (model/engine_process.py): prefilled after
    # the prompt, counted as generated, and its next token drawn as it would have been without the restart
    resumed: list = field(default_factory=list)

    @property
    def max_new_tokens(self):
        return self.params.max_new_tokens

    def end(self):
        """Why it leaves the batch now: "error", "cancelled", "stop" (its grammar is complete) or "length"; or None."""
        if self.error or self.cancelled:
            return "error" if self.error else "cancelled"
        if self.sampler is not None and self.sampler.complete:
            return "stop"
        return "length" if self.generated >= self.max_new_tokens else None

    def cancel(self):
        self.cancelled = True  # read by the engine thread between steps
        if self.on_cancel:
            self.on_cancel()


class Outcome:
    """The `emit` of a caller that waits for a whole request (the generate helpers): its events, and `done`
    once it has finished."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    def ids(self):
        """The generated ids of a finished request; RuntimeError if it ended in an error."""
        if self.events[-1].reason == "error":
            raise RuntimeError(self.events[-1].error)
        return [event.id for event in self.events if isinstance(event, Token)]


@dataclass
class Tracked:
    """A request the child holds, with what it has delivered so far: what a new child needs to resume it."""

    req: Request
    tokens: list = field(default_factory=list)
    last: bool = False  # its last Token was delivered (Token.last): only its Finished was to follow
    scored: bool = False  # its PromptLogprobs were delivered: not asked for again
    started: bool = False  # the child has begun it (admitted to its batch or its scoring)
    progress_at_death: int | None = None  # its progress at the last death it saw, when it had been begun

    @property
    def progress(self):
        return len(self.tokens) + self.scored
