"""Constrained output: llguidance (the engine llama.cpp and vLLM use) keeps each sampled token inside a grammar.

A request's SamplingParams.grammar is llguidance's grammar text (app/constraints.py makes it from a JSON schema, a
regex or a Lark grammar). Its Sampler holds an LLMatcher over the model's own vocabulary (characters, bytes or BPE
tokens, each as its bytes); before each draw, the step's constrained rows get their token masks, and every token a
mask leaves out gets a logit of -inf: greedy and sampled rows alike pick only tokens that keep the text a prefix of a
match. The masks of the rows that took a token are computed together by llguidance's executor (its Rust threads,
without the GIL) in a thread of ours, started as soon as the tokens are taken: the engine's next forward runs
meanwhile, so the other rows wait only for what the forward did not hide.

Our models have no end-of-text token, so the vocabulary llguidance sees has one more, END (id vocab_size): when the
grammar allows nothing else (a JSON object's closing brace), the request is complete and ends with "stop". A grammar
that could go on (a regex's `[0-9]+`) goes on until max_new_tokens ends it with "length", as an unconstrained
request does; so does one that max_new_tokens cuts short: its text is then a prefix of a match, never claimed whole.
"""

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import llguidance
import numpy as np
import torch

END_BYTES = b"<|quill_end|>"  # END's text, as a special token: no text ever matches it
DEAD_END = "the output format cannot be continued: no token of this model's vocabulary extends the text to a match"


class _Wrapped:
    """The model's tokenizer as llguidance's TokenizerWrapper reads one: each id's bytes, END, and encode."""

    def __init__(self, tokenizer):
        if tokenizer.kind == "char":
            self.tokens = [c.encode("utf-8") for c in tokenizer.chars]
        elif tokenizer.kind == "byte":
            self.tokens = [bytes([b]) for b in range(256)]
        else:
            self.tokens = list(tokenizer.token_bytes)
        # a BPE's special tokens (an imported GPT-2's <|endoftext|>) are never text that a format allows
        added = tokenizer.tokenizer.get_added_tokens_decoder() if tokenizer.kind == "bpe" else {}
        self.eos_token_id = len(self.tokens)
        self.tokens.append(END_BYTES)
        self.special_token_ids = [*(i for i, t in added.items() if t.special), self.eos_token_id]
        self.bos_token_id, self.tokenizer = None, tokenizer

    def __call__(self, data):  # llguidance hands over bytes; a character vocabulary stops at what it lacks
        text = data.decode("utf-8", errors="ignore")
        if self.tokenizer.kind == "char":
            known = self.tokenizer.stoi
            text = text[: next((i for i, c in enumerate(text) if c not in known), len(text))]
        return self.tokenizer.encode(text)


@functools.lru_cache(maxsize=16)
def vocabulary(tokenizer):
    """The tokenizer's Vocabulary in this process: the app's checks and an engine in a thread of the app share it,
    so a 50k BPE's llguidance tables are made once."""
    return Vocabulary(tokenizer)


class Vocabulary:
    """One model's vocabulary for llguidance: matchers for requests, and the masks of a step's rows."""

    def __init__(self, tokenizer):
        self.tokenizer, self.size = tokenizer, tokenizer.vocab_size
        self.partial = tokenizer.kind == "char"  # some bytes are no token's: a match may end where text could go on
        self.words = (self.size + 1 + 31) // 32  # int32 words of a row's mask: the vocabulary and END
        self._ll, self._lock = None, threading.Lock()

    @property
    def ll(self):  # made at the first constrained request, not at every start: a 50k BPE's tables take a moment
        with self._lock:  # once, though the app's threads and the engine's may ask at the same time
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(self.tokenizer)))
        return self._ll

    @functools.cached_property
    def executor(self):  # llguidance's threads, one mask each
        return llguidance.LLExecutor()

    @functools.cached_property
    def pool(self):  # the thread that computes the next step's masks while the engine's forward runs
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="quill-masks")

    def matcher(self, grammar, consumed=()):
        """An LLMatcher of `grammar` that has read the tokens `consumed` (a resumed request's); ValueError when the
        grammar does not compile or they do not match it."""
        matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if consumed and not matcher.is_error():
            matcher.consume_tokens(list(consumed))
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def check(self, grammar):
        """Why `grammar` cannot constrain this model's output (it does not compile, or no token of the vocabulary
        can begin a match), or None."""
        try:
            matcher = self.matcher(grammar)
        except ValueError as e:
            return str(e)
        allowed = self.first_allowed(matcher)
        if matcher.is_error():  # a limit of llguidance's, or a grammar that can match nothing
            return matcher.get_error().splitlines()[0]
        # where the grammar forces bytes that no token holds (a "{" a character vocabulary lacks), llguidance's mask
        # allows every token: its first then does not match
        first = allowed.nonzero()[:, 0].tolist()[:1]
        if not first or matcher.validate_tokens(first) != 1:
            return "no token of this model's vocabulary can begin text that matches it"
        return None

    def first_allowed(self, matcher):
        """(vocab_size,) bools: the tokens `matcher` allows next (END left out), computed now."""
        return self.allowed(np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)[None])[0, : self.size]

    def ended(self, sampler):
        """After a token: "stop" when the sampler's text is a whole match that can go no further (llguidance says so,
        or, in a vocabulary that lacks bytes, a match none of whose continuations it has), DEAD_END when the grammar
        refused the token, else None. The mask that the second case computes is kept as the sampler's next one: the
        prefetch does not compute it again."""
        matcher = sampler.matcher
        if matcher.is_error():
            return DEAD_END
        if matcher.is_stopped():
            return "stop"
        if self.partial and matcher.is_accepting():
            masks = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)[None]  # (1, words)
            sampler.prefetched = (masks, 0)
            if not self.allowed(masks)[0, : self.size].any():
                return "stop"
        return None

    def allowed(self, masks):
        """(N, words) int32 bit masks as (N, vocab_size + 1) bools."""
        bits = np.unpackbits(np.ascontiguousarray(masks).view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, : self.size + 1].astype(bool))

    def masks(self, samplers):
        """(N, words) int32 bit masks of the samplers' next tokens, computed together (without the GIL)."""
        masks = np.zeros((len(samplers), self.words), dtype=np.int32)
        pairs = [(s.matcher, k) for k, s in enumerate(samplers)]
        self.executor.unsafe_compute_mask_ptr(pairs, masks.ctypes.data, self.words * 4, len(samplers))
        return masks

    def prefetch(self, samplers):
        """Start computing the masks of the samplers' next tokens (each has just taken its token; those whose mask
        ended() computed are left out) in this vocabulary's thread: the engine's next forward runs meanwhile, and
        constrain() takes them then."""
        samplers = [s for s in samplers if s.prefetched is None]
        if samplers:
            future = self.pool.submit(self.masks, samplers)
            for k, s in enumerate(samplers):
                s.prefetched = (future, k)

    def constrain(self, logits, samplers, rows):
        """(len(rows), V): rows `rows` of (B, V) `logits`, each token that samplers[k]'s grammar leaves out of row
        rows[k] at -inf. A new tensor of those rows only: the model's own logits (its logprobs) stay as they were,
        and the other rows are not copied. The masks prefetched are taken, the others computed now. A row whose mask
        allows no token is left as it is, and its sampler marked failed (DEAD_END): the engine ends it instead of
        sending what it draws (as it does when the grammar refuses the token drawn: a mask that allowed every token,
        see check)."""
        masks, missing = np.zeros((len(rows), self.words), dtype=np.int32), []
        for k, s in enumerate(samplers):
            if s.prefetched:  # an array (ended's) or a future (prefetch's), and its row
                source, i = s.prefetched
                masks[k] = (source if isinstance(source, np.ndarray) else source.result())[i]
            else:
                missing.append(k)
            s.prefetched = None
        if missing:
            masks[missing] = self.masks([samplers[k] for k in missing])
        allowed = self.allowed(masks)[:, : self.size].to(logits.device)
        dead = ~allowed.any(-1)
        for k in dead.nonzero()[:, 0].tolist():
            samplers[k].failed = DEAD_END
        allowed[dead] = True
        if list(rows) == list(range(len(logits))):  # every row: one copy, the masked one
            return logits.masked_fill(~allowed, -torch.inf)
        return logits[torch.tensor(rows, device=logits.device)].masked_fill_(~allowed, -torch.inf)  # gathered: a copy
