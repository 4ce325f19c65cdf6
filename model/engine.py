"""The generation engine: token ids in, token ids out; no HTTP, no text.

One thread runs a loop of steps. Each step admits waiting requests (prefilled together: one forward for prompts of
similar length, the shorter padded; a prefix a cache row holds is copied, not computed), then advances every active
request by one token with a single batched forward that reads the KV cache (GPT) or the carried hidden state (LSTM).
Both are the model's own forward (its kv_cache or state argument): this module holds only the schedule
(model/cache.py the storage), so serving runs the arithmetic that training ran. Finished or cancelled requests leave
between steps, and their slot goes to the next request. Active requests always occupy slots 0..B-1, so a step reads
the caches as views without gathering. A leaving request's slot is filled by moving the last one into it.

A request that asks for its prompt's logprobs (echo, scoring) is scored first, one window of the model's context
between two steps (the windows of prompts queued together in one forward), so a long text to score never stops the
other streams for long; the n choices of one prompt are scored once.

Past the GPT's context: a row whose cache is full is re-prefilled with its last context_size // 2 tokens at
positions 0.. and continues from there (a sliding window that halves; the re-prefill is amortised over the
context_size // 2 steps that follow). Up to context_size tokens greedy output equals GPT.generate's token for token.
"""

import threading
import time
from collections import deque
from dataclasses import replace

import torch

from model import sampling
from model.cache import GPTCache, LSTMState, window_start
from model.device import poisoned
from model.gpt import GPT
from model.grammar import vocabulary
from model.request import Finished, Outcome, Request, Token
from model.sampling import Sampler, SamplingParams
from model.scoring import PromptLogprobs, Scoring, score_step, together, token_logprobs

__all__ = ["Engine", "Finished", "Outcome", "Request", "Token"]  # the request's types, for the engine's users

PREFILL_LOGITS = 2**24  # floats: a scoring forward's logits (every position's) stay under 64 MB
PREFILL_ACTIVATIONS = 2**24  # floats: a prefill's largest activation (the MLP's, 4 x hidden_size a token) likewise


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
        on_progress=None,
        exit_on_device_error=False,
        weights=None,
        prefix_cache=True,
        tokenizer=None,
    ):
        self.model = model.eval()
        self.max_batch = max_batch
        is_gpt = isinstance(model, GPT)
        kept = (compiled, compile_folder, weights, prefix_cache)  # weights: the checkpoint file, compiled from
        self.cache = GPTCache(model, max_batch, *kept) if is_gpt else LSTMState(model, max_batch)
        # tokens a batched forward takes, at least a context: a prefill's, a scoring's (every position's logits)
        context, config = self.cache.context or 1, model.config
        self.prefill_tokens = max(context, PREFILL_ACTIVATIONS // (4 * config.hidden_size))
        self.scoring_tokens = max(context, PREFILL_LOGITS // config.vocab_size)
        self.vocabulary = tokenizer and vocabulary(tokenizer)  # constrained output: one a tokenizer, the app's too
        self.on_step = on_step  # called after each decode step with the batch size (metrics)
        # called after each piece of work (a prefill group, a scoring window, a decode step): a heartbeat
        self.on_progress = on_progress or (lambda: None)
        # an engine process (model/engine_child.py) ends on an error that leaves the device unusable (poisoned), for
        # its supervisor to replace it and resume its requests; an engine in a thread ends the requests instead
        self.exit_on_device_error = exit_on_device_error
        self.threads = threads  # torch threads for the engine thread (OpenMP's setting is per thread)
        self.clock = clock
        self.waiting = deque()
        self.active = []  # active[i] occupies cache slot i
        self.scoring = deque()  # Scorings, the first advanced by one window a step
        self.scored = None  # (key, PromptLogprobs) of the last one finished
        self.cond = threading.Condition()
        self.running = False
        self.thread = None
        self.down = None  # an engine in this process is never restarting (EngineProcess's interface)

    # -- the caller's side (any thread) --

    def submit(self, req):
        if not req.prompt:
            raise ValueError("prompt must hold at least one token")
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()

    def warm_up(self, on_built=None, background=False):
        """For an engine stepped in the caller's thread (not start()ed): compile the decode step if asked (see
        GPTCache), then run one prefill and one decode step. A started engine does this itself, in its own
        thread: a compiled step is only good for the torch thread count it was compiled under."""
        self.cache.warm_up(on_built, background, torch.get_num_threads())
        self.generate([0], 2, temperature=0.0)

    def compiled_sizes(self):
        return self.cache.compiled_sizes()

    def counts(self):
        """(active, waiting): read without the lock, so a snapshot, good for gauges and admission."""
        return len(self.active), len(self.waiting) + sum(len(job.reqs) for job in list(self.scoring))

    def busy(self):
        return bool(self.waiting or self.active or self.scoring)

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
        self.cache.stop()

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
        self.cache.warm_up(background=True, threads=torch.get_num_threads())  # requests meanwhile wait their turn
        while True:
            with self.cond:
                while self.running and not self.busy():
                    self.cond.wait()
                if not self.running:
                    break
            self.step()
        for req in self.active + list(self.waiting) + [req for job in self.scoring for req in job.reqs]:
            self._emit(req, Finished("error", "engine stopped"))
        self.active, self.waiting, self.scoring = [], deque(), deque()

    def step(self):
        """Score one window of a prompt if one is being scored, admit, then advance every active request by
        one token."""
        try:
            with torch.no_grad():  # once a step, not once a call: it costs microseconds a token
                self._score()
                self._admit()
                self._decode()
        except Exception as e:  # a failed step ends the requests in it, never the engine
            if self.exit_on_device_error and poisoned(e):
                raise
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
            req.started_at = req.started_at or self.clock()
            # in the next place before it leaves the queue (a scoring, the batch): counts() never misses it
            queued = req.params.prompt_logprobs is not None and self._queue_scoring(req)
            if not queued and req.max_new_tokens > 0:
                req.sampler = Sampler(req.params, req.prompt, req.resumed, self.vocabulary)
                req.tokens, req.generated = req.prompt + req.resumed, len(req.resumed)
                self.active.append(req)
                admitted += 1
            with self.cond:
                self.waiting.popleft()
            if not queued and req.max_new_tokens == 0:  # nothing (more) asked: over at once
                self._emit(req, Finished("length"))
        if admitted:
            self._prefill(len(self.active) - admitted)
        self._leave()

    def _prefill(self, first):
        """Prefill the requests just admitted into slots first.., batched: sorted by prompt length, so that
        little is padding, in groups of at most prefill_tokens padded tokens; then sample each one's first
        token. A group that fails ends its own requests with the error (a prompt too long for the device's
        memory), not the others'."""
        context = self.cache.context
        pairs = sorted(
            (
                (req.tokens[window_start(len(req.prompt), len(req.tokens), context) :] if context else req.tokens, req)
                for req in self.active[first:]
            ),
            key=lambda pair: len(pair[0]),
        )
        seqs, new = [ids for ids, _ in pairs], [req for _, req in pairs]
        self.active[first:] = new  # their slots hold nothing yet: any order will do
        start = 0
        while start < len(new):
            end = start + 1
            while end < len(new) and (end + 1 - start) * len(seqs[end]) <= self.prefill_tokens:
                end += 1
            group = new[start:end]
            try:
                logits = self.cache.prefill(first + start, seqs[start:end])
                rows = self._finite(group, logits)
                tokens = dict(zip(rows, sampling.sample([group[i].sampler for i in rows], logits[rows])))
                scored = token_logprobs(group, rows, logits, tokens)
                for i in rows:
                    self._append(group[i], tokens[i], scored.get(i, (None, ())))
            except Exception as e:  # leaves at the next _leave, before any decode step reads its row
                if poisoned(e):
                    raise
                for req in group:
                    req.error = f"{type(e).__name__}: {e}"
            self.on_progress()
            start = end

    def _decode(self):
        if not self.active:
            return
        for slot, req in enumerate(self.active):
            if self.cache.room(slot) == 0:  # full: slide the window (see the module docstring)
                self.cache.prefill(slot, [req.tokens[-(self.cache.context // 2) - 1 : -1]])
                self.on_progress()  # rows that started together slide together: each is a forward
        logits = self.cache.decode([req.tokens[-1] for req in self.active])  # (B, V)
        good = self._finite(self.active, logits)
        # the rows that only want the likeliest token take one argmax over the batch; the others are drawn together
        plain = [req.sampler.only_argmax for req in self.active]
        tokens = logits.argmax(-1).tolist() if any(plain) else [None] * len(plain)
        rest = [i for i in good if not plain[i]]
        if rest:
            rows = logits if len(rest) == len(plain) else logits[rest]
            for i, token in zip(rest, sampling.sample([self.active[i].sampler for i in rest], rows)):
                tokens[i] = token
        scored = token_logprobs(self.active, good, logits, tokens)
        for i in good:
            self._append(self.active[i], tokens[i], scored.get(i, (None, ())))
        if self.on_step:
            self.on_step(len(self.active))
        self.on_progress()
        self._leave()

    @staticmethod
    def _finite(reqs, logits):
        """The rows of (B, V) logits that hold no NaN or inf (one reduction a step); the request of any other fails
        with an error that says so, and no token is drawn from it (CUDA's sampler would poison the process)."""
        if bool(torch.isfinite(logits).all()):
            return list(range(len(reqs)))
        finite = torch.isfinite(logits).all(-1).tolist()
        for req, ok in zip(reqs, finite):
            if not ok:
                req.error = "the model's output held NaN or infinity at this token (try float32: QUILL_DTYPE)"
        return [i for i, ok in enumerate(finite) if ok]

    def _queue_scoring(self, req):
        """Join the scoring of req's prompt under way, or start one (True); or, when the last one finished scored
        the same prompt, send that at once (False: the request goes on as one that asked for no scoring)."""
        key = (tuple(req.prompt), req.params.prompt_logprobs)
        if self.scored and self.scored[0] == key:
            self._emit(req, self.scored[1])
            req.params = replace(req.params, prompt_logprobs=None)
            return False
        job = next((job for job in self.scoring if job.key == key), None)
        if job is None:
            self.scoring.append(job := Scoring(key, self.cache.context))
        job.reqs.append(req)
        return True

    def _score(self):
        """Advance the first scorings (as many as scoring_tokens hold: a list's prompts, or requests' that came
        together) by one window each, in one forward; send each one that is whole to every request that asked."""
        for job in self.scoring:
            for req in [r for r in job.reqs if r.cancelled]:
                job.reqs.remove(req)
                self._emit(req, Finished("cancelled"))
        self.scoring = deque(job for job in self.scoring if job.reqs)
        if not self.scoring:
            return
        group = together(self.scoring, self.scoring_tokens)
        try:
            whole = score_step(self.model, group)
        except Exception as e:  # these requests' failure, not the batch's
            for req in [req for job in group for req in job.reqs]:
                self._emit(req, Finished("error", f"{type(e).__name__}: {e}"))
            whole = group
        else:
            for job in reversed(whole):  # each one's requests go to the front of the queue: the first last
                self.scored = (job.key, job.result())
                self._scored(job.reqs, job.result())
        self.scoring = deque(job for job in self.scoring if job not in whole)
        self.on_progress()

    def _scored(self, reqs, result: PromptLogprobs):
        """Send the scoring; a request for no new tokens (echo, scoring a text) is over, the others wait at the
        front of the queue to generate, not to be scored again."""
        go_on = []
        for req in reqs:
            self._emit(req, result)
            if req.max_new_tokens == 0:
                self._emit(req, Finished("length"))
            else:
                req.params = replace(req.params, prompt_logprobs=None)
                go_on.append(req)
        with self.cond:
            self.waiting.extendleft(reversed(go_on))

    def _append(self, req, token, scored=(None, ())):
        """Send `token` as req's next, with (its logprob, the likeliest tokens) when the request asked for them; the
        last when it makes max_new_tokens or completes its grammar. One whose grammar cannot go on ends without it."""
        if req.sampler.failed:
            req.error = req.sampler.failed
            return
        req.tokens.append(token)
        req.generated += 1
        self._emit(req, Token(token, req.generated == req.max_new_tokens or req.sampler.complete, *scored))

    def _leave(self):
        """Finished, failed and cancelled requests leave; the last active row moves into each freed slot."""
        for slot in range(len(self.active) - 1, -1, -1):
            req = self.active[slot]
            if reason := req.end():
                last = len(self.active) - 1
                if slot != last:
                    self.cache.move(last, slot)
                    self.active[slot] = self.active[last]
                self.active.pop()  # before its Finished: a client that has it counts the request gone
                self._emit(req, Finished(reason, req.error))

    @staticmethod
    def _emit(req, event):
        try:
            req.emit(event)
        except Exception:  # a broken listener must not take the batch down with it
            req.cancelled = True
