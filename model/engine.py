"""The generation engine: token ids in, token ids out; no HTTP, no text.

One thread runs a loop of steps. Each step admits waiting requests (prefilled together: one
forward for prompts of similar length, the shorter padded), then advances every active request
by one token with a single batched forward that reads the KV cache (GPT) or the carried hidden
state (LSTM). Both are the model's own forward (its
kv_cache or state argument): this module holds only the storage, the slots and the schedule,
so serving runs the arithmetic that training ran. Finished or cancelled requests leave
between steps, and their slot goes to the next request.

Active requests always occupy slots 0..B-1, so a step reads the caches as views without
gathering. A leaving request's slot is filled by moving the last one into it.

Past the GPT's context: a row whose cache is full is re-prefilled with its last
context_size // 2 tokens at positions 0.. and continues from there (a sliding window that
halves; the re-prefill is amortised over the context_size // 2 steps that follow). Up to
context_size tokens the output equals GPT.generate token for token.
"""

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.compiled import CompiledSteps
from model.gpt import GPT, KVCache
from model.sampling import Sampler, SamplingParams
from model.scoring import score_prompt, top_logprobs

log = logging.getLogger("quill")

PREFILL_LOGITS = 2**24  # 64 MB of float32 logits


def batch_buckets(max_batch):
    """The batch sizes a compiled decode step is built for: powers of two below max_batch, and max_batch.
    A step pads its batch to the next one, so a handful of fixed shapes serve every batch size."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes + [max_batch] if max_batch > 1 else sizes


class GPTCache:
    """Storage for the GPT's cached forward: preallocated keys and values for max_batch rows, one tensor
    per layer, and a length per row. The model reads and writes them (GPT.forward's kv_cache); this class
    only slots them. With `compiled`, decode steps run a step compiled ahead of time (model/compiled.py)
    for each batch size in batch_buckets, a batch padded to the next one; its attention reads the first
    max(length) + 1 positions, masked past each row's length. Packages are kept in `compile_folder`.
    Prefills stay eager."""

    def __init__(self, model: GPT, max_batch, compiled=False, compile_folder=None):
        self.model = model
        cfg = model.config
        self.context = cfg.context_size
        p = next(model.parameters())
        self.device = p.device
        # one tensor per layer, not views of one: a compiled step then writes them in place. One position
        # more than a row ever holds: a compiled step reads a dynamic span of them, never the whole, which
        # export would otherwise have to treat apart (a whole tensor is a view of another shape)
        shape = (max_batch, cfg.n_head, self.context + 1, cfg.hidden_size // cfg.n_head)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.length = [0] * max_batch
        self.buckets = batch_buckets(max_batch)
        self.step = CompiledSteps(model, self.k, self.v, compile_folder) if compiled else None

    def room(self, slot):
        return self.context - self.length[slot]

    def prefill(self, first, seqs):
        """Fill rows first.. from scratch, one with each of `seqs` (token id lists of at most context_size,
        any lengths), in one forward: a shorter one is padded at its end, and what the padding writes lies
        past the row's length, where no later token looks and the next ones overwrite it. The last
        logits of each, (N, V)."""
        lengths = [len(ids) for ids in seqs]
        longest = max(lengths)
        self.length[first : first + len(seqs)] = [0] * len(seqs)
        logits = self._forward(first, [ids + [0] * (longest - len(ids)) for ids in seqs])
        self.length[first : first + len(seqs)] = lengths
        return logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]

    def decode(self, ids):
        """Append one token to each of rows 0..B-1 and return their next-token logits (B, V)."""
        if self.step is None:
            return self._forward(0, [[t] for t in ids])[:, -1]
        B = len(ids)
        n = next(b for b in self.buckets if b >= B)
        held = self.length[:B]
        # rows B..n-1 are free slots: they compute a junk token at position 0, which a prefill overwrites
        tokens = torch.tensor(ids + [0] * (n - B), device=self.device).view(n, 1)
        lengths = torch.tensor(held + [0] * (n - B), device=self.device)
        logits = self.step(tokens, lengths, max(held))[:B]
        self.length[:B] = [h + 1 for h in held]
        return logits

    @torch.no_grad()
    def warm_up(self):
        """Compile (or load) the step for every bucket now, not in a user's request. If that fails, say so
        in one line and decode eagerly: a slower server, never a broken one."""
        if self.step is None:
            return
        try:
            self.step.build(self.buckets)
        except Exception as e:  # inductor's messages run to many lines: the first says what failed
            why = (str(e).strip().splitlines() or [""])[0]
            log.warning("compiling the decode step failed, decoding without it: %s: %s", type(e).__name__, why)
            self.step = None

    def _forward(self, first, ids):
        """The model's forward over rows first.. with ids (N, T) as their new tokens; logits (N, T, V)."""
        rows = slice(first, first + len(ids))
        held = self.length[rows]
        lengths = torch.tensor(held, device=self.device)
        cache = KVCache([k[rows] for k in self.k], [v[rows] for v in self.v], lengths, max(held))  # views
        logits, _ = self.model(torch.tensor(ids, device=self.device), kv_cache=cache)
        self.length[rows] = [n + len(ids[0]) for n in held]
        return logits

    def move(self, src, dst):
        for k, v in zip(self.k, self.v):
            k[dst], v[dst] = k[src], v[src]
        self.length[dst] = self.length[src]


class LSTMState:
    """Storage for the LSTM's carried (h, c) of max_batch rows: no context limit, nothing to slide."""

    context = None

    def __init__(self, model, max_batch):
        self.model = model
        self.h, self.c = model.zero_state(max_batch)  # (n_layer, max_batch, D) each

    def room(self, slot):
        return math.inf

    def warm_up(self):
        pass  # nothing to compile

    def prefill(self, first, seqs):
        """As GPTCache.prefill, one row at a time: the state after padding would not be the prompt's."""
        out = []
        for slot, ids in enumerate(seqs, first):
            self.h[:, slot], self.c[:, slot] = 0, 0
            out.append(self._forward(slot, [ids])[0, -1])
        return torch.stack(out)

    def decode(self, ids):
        return self._forward(0, [[t] for t in ids])[:, -1]

    def _forward(self, first, ids):
        rows = slice(first, first + len(ids))
        # views of the storage, which the model's forward overwrites with the state after ids
        logits, _ = self.model(torch.tensor(ids, device=self.h.device), state=(self.h[:, rows], self.c[:, rows]))
        return logits

    def move(self, src, dst):
        self.h[:, dst], self.c[:, dst] = self.h[:, src], self.c[:, src]


@dataclass(frozen=True)
class Token:
    id: int
    last: bool = False  # the request's max_new_tokens-th token: a Finished("length") follows
    logprob: float | None = None  # with params.logprobs: the model's log-probability of this token
    top: tuple = ()  # and its params.logprobs likeliest tokens there, ((id, logprob), ...)


@dataclass(frozen=True)
class Finished:
    reason: str  # "length", "cancelled" or "error"
    error: str | None = None  # what failed, when reason is "error"


@dataclass
class Request:
    """One generation. `emit(event)` is called from the engine thread with a Token per generated
    token, then one Finished."""

    prompt: list
    params: SamplingParams
    emit: callable
    cancelled: bool = False
    tokens: list = field(default_factory=list)  # prompt + generated, the sliding window's source
    generated: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float = None
    sampler: Sampler = None  # made when admitted: the seeded generator and the ids seen
    on_cancel: callable = None  # called by cancel(): an engine in another process is told there

    @property
    def max_new_tokens(self):
        return self.params.max_new_tokens

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


class Engine:
    """Continuous batching over one model in a dedicated thread."""

    def __init__(
        self,
        model,
        max_batch=32,
        on_step=None,
        clock=time.perf_counter,
        threads=None,
        compiled=False,
        compile_folder=None,
    ):
        self.model = model.eval()
        self.max_batch = max_batch
        is_gpt = isinstance(model, GPT)
        self.cache = GPTCache(model, max_batch, compiled, compile_folder) if is_gpt else LSTMState(model, max_batch)
        # tokens in one batched prefill: at least a whole context, and logits of at most PREFILL_LOGITS
        self.prefill_tokens = max(self.cache.context or 1, PREFILL_LOGITS // model.config.vocab_size)
        self.on_step = on_step  # called after each decode step with the batch size (metrics)
        self.threads = threads  # torch threads for the engine thread (OpenMP's setting is per thread)
        self.clock = clock
        self.waiting = deque()
        self.active = []  # active[i] occupies cache slot i
        self.cond = threading.Condition()
        self.running = False
        self.thread = None

    # -- the caller's side (any thread) --

    def submit(self, req):
        if not req.prompt:
            raise ValueError("prompt must hold at least one token")
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()

    def warm_up(self):
        """For an engine stepped in the caller's thread (not start()ed): compile the decode step if asked
        (see GPTCache), then run one prefill and one decode step. A started engine does this itself, in
        its own thread: a compiled step is only good for the torch thread count it was compiled under."""
        self.cache.warm_up()
        self.generate([0], 2, temperature=0.0)

    def counts(self):
        """(active, waiting): read without the lock, so a snapshot, good for gauges and admission."""
        return len(self.active), len(self.waiting)

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="quill-engine", daemon=True)
        self.thread.start()

    def stop(self):
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread:
            self.thread.join()

    def generate(self, prompt, max_new_tokens, **sampling):
        """Blocking helper (tests, benchmarks, warm-up): run one request to the end, return its ids.
        `sampling`: SamplingParams' fields."""
        outcome = Outcome()
        req = Request(list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **sampling), outcome)
        if self.running:
            self.submit(req)
            outcome.done.wait()
        else:
            self.waiting.append(req)
            while not outcome.done.is_set():
                self.step()
        return outcome.ids()

    # -- the engine thread --

    def _loop(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        self.cache.warm_up()  # requests submitted meanwhile wait in the queue
        while True:
            with self.cond:
                while self.running and not self.waiting and not self.active:
                    self.cond.wait()
                if not self.running:
                    break
            self.step()
        for req in self.active + list(self.waiting):
            self._emit(req, Finished("error", "engine stopped"))
        self.active, self.waiting = [], deque()

    def step(self):
        """Admit, then advance every active request by one token."""
        try:
            with torch.no_grad():  # once a step, not once a call: it costs microseconds a token
                self._admit()
                self._decode()
        except Exception as e:  # a failed step ends the requests in it, never the engine
            for req in self.active:
                self._emit(req, Finished("error", f"{type(e).__name__}: {e}"))
            self.active = []

    def _admit(self):
        self._leave()
        admitted = 0
        while self.waiting and len(self.active) < self.max_batch:
            req = self.waiting[0]
            if req.cancelled:
                with self.cond:
                    self.waiting.popleft()
                self._emit(req, Finished("cancelled"))
                continue
            req.started_at = self.clock()
            scoring = req.params.prompt_logprobs is not None or req.max_new_tokens == 0
            if scoring and not self._score(req):  # the request is over: nothing to generate, or the scoring failed
                continue
            req.sampler = Sampler(req.params, req.prompt)
            req.tokens = list(req.prompt)
            # active before it leaves the queue: counts() may see it twice, never zero times
            self.active.append(req)
            with self.cond:
                self.waiting.popleft()
            admitted += 1
        if admitted:
            self._prefill(len(self.active) - admitted)
        self._leave()

    def _prefill(self, first):
        """Prefill the requests just admitted into slots first.., batched: sorted by prompt length, so that
        little is padding, in groups of at most prefill_tokens padded tokens (a group's logits are that
        many rows of vocabulary); then sample each one's first token."""
        window = self.cache.context
        pairs = sorted(
            ((req.tokens[-window:] if window else req.tokens, req) for req in self.active[first:]),
            key=lambda pair: len(pair[0]),
        )
        seqs, new = [ids for ids, _ in pairs], [req for _, req in pairs]
        self.active[first:] = new  # their slots hold nothing yet: any order will do
        start = 0
        while start < len(new):
            end = start + 1
            while end < len(new) and (end + 1 - start) * len(seqs[end]) <= self.prefill_tokens:
                end += 1
            for req, logits in zip(new[start:end], self.cache.prefill(first + start, seqs[start:end])):
                self._sample(req, logits)
            start = end

    def _decode(self):
        if not self.active:
            return
        for slot, req in enumerate(self.active):
            if self.cache.room(slot) == 0:  # full: slide the window (see the module docstring)
                self.cache.prefill(slot, [req.tokens[-(self.cache.context // 2) - 1 : -1]])
        logits = self.cache.decode([req.tokens[-1] for req in self.active])  # (B, V)
        # the rows that only want the likeliest token take it from one argmax over the batch
        plain = [req.sampler.only_argmax for req in self.active]
        greedy = logits.argmax(-1).tolist() if any(plain) else None
        for i, req in enumerate(self.active):
            if plain[i] and req.params.logprobs is None:  # no need of the row's logits: not even a view of them
                self._sample(req, None, greedy[i])
            else:
                self._sample(req, logits[i], greedy[i] if plain[i] else None)
        if self.on_step:
            self.on_step(len(self.active))
        self._leave()

    def _score(self, req):
        """Send the prompt's PromptLogprobs when asked. A request for no new tokens (echo, scoring a text)
        leaves the queue here; return whether the request goes on to generate."""
        try:
            if req.params.prompt_logprobs is not None:
                self._emit(req, score_prompt(self.model, self.cache.context, req.prompt, req.params.prompt_logprobs))
            end = Finished("length") if req.max_new_tokens == 0 else None
        except Exception as e:  # this request's failure, not the batch's
            end = Finished("error", f"{type(e).__name__}: {e}")
        if end:
            with self.cond:
                self.waiting.popleft()
            self._emit(req, end)
        return end is None

    def _sample(self, req, logits, token=None):
        """Take `token` (when the batch's argmax gave it), else the request's sampler's choice from `logits`."""
        token = req.sampler(logits) if token is None else token
        req.tokens.append(token)
        req.generated += 1
        logprob, top = None, ()
        if req.params.logprobs is not None:  # the model's own distribution: before temperature and penalties
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            logprob, top = float(logprobs[token]), top_logprobs(logprobs[None], req.params.logprobs)[0]
        self._emit(req, Token(token, req.generated == req.max_new_tokens, logprob, top))

    def _leave(self):
        """Finished and cancelled requests leave; the last active row moves into each freed slot."""
        for slot in range(len(self.active) - 1, -1, -1):
            req = self.active[slot]
            if req.cancelled or req.generated >= req.max_new_tokens:
                self._emit(req, Finished("cancelled" if req.cancelled else "length"))
                last = len(self.active) - 1
                if slot != last:
                    self.cache.move(last, slot)
                    self.active[slot] = self.active[last]
                self.active.pop()

    @staticmethod
    def _emit(req, event):
        try:
            req.emit(event)
        except Exception:  # a broken listener must not take the batch down with it
            req.cancelled = True
