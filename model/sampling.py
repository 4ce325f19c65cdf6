"""How a request wants its tokens chosen (SamplingParams) and the sampler that reads it.

The request bodies convert themselves into a SamplingParams once; the object travels whole
through the engine to the request's Sampler, so a new sampling knob is added here, in the
protocol and in the playground, and nowhere else (the engine only calls `sample(samplers, logits)`).

Draws are counter-based: the token at a request's n-th generated place is picked by a uniform that
is a hash of (seed, n), by inverse transform sampling over its filtered distribution. So a draw
depends on nothing else: not on the other rows of its batch, not on what the process ran before,
and not on a restart that prefills the text again and continues (model/engine_process.py).
"""

import math
from dataclasses import dataclass

import torch

# Below this, sampling differs from argmax only between logits closer than ~1e-4, and logits /
# temperature can overflow to inf (a NaN softmax that would fail the whole batch): so it is greedy.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) is greedy
    top_k: int | None = None  # keep the k likeliest tokens
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # CTRL's: divide a seen token's positive logit by it, multiply a negative one
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was already generated
    seed: int = 0
    stop: tuple[str, ...] = ()  # text-level: the app's text stream ends on these, the engine never sees them
    # What the engine reports besides the tokens, from the model's own distribution (before any of the above):
    logprobs: int | None = None  # each generated token's log-probability and this many likeliest alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none)
    grammar: str | None = None  # llguidance's grammar that the output must match (model/grammar.py)

    @property
    def greedy(self):
        return self.temperature < MIN_TEMPERATURE


MASK64, GOLDEN = 2**64 - 1, 0x9E3779B97F4A7C15


def _mix(z):
    """splitmix64's finaliser: 64 bits in, 64 well-mixed bits out."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform(seed, position):
    """The uniform in [0, 1) that picks the token at `position` (0: the first generated) of a request seeded
    `seed`. 29 bits: times a float32 total it is exact in float64, and always below the total."""
    return (_mix((_mix(seed & MASK64) + (position + 1) * GOLDEN) & MASK64) >> 35) / 2**29


def penalize(logits, seen, penalty):
    """(V,) logits with each token marked in `seen` ((V,) bool: prompt and output so far) made less likely."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def penalized(logits, params, seen=None, counts=None):
    """(V,) logits after the request's penalties. `seen`: a (V,) bool mask of the ids the request has seen,
    needed only when params.repetition_penalty != 1; `counts`: (V,) how often each id was generated, needed
    only when a presence or frequency penalty is set."""
    if params.repetition_penalty != 1.0:
        logits = penalize(logits, seen, params.repetition_penalty)
    if counts is not None:  # OpenAI's formula: generated tokens only, not the prompt; in float32, where a small
        # penalty still moves a large logit (bfloat16 would round 20.0 - 0.06 back to 20.0)
        logits = logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def draw(logits, params, u):
    """One token per row of (B, V) logits, none greedy: row i after params[i]'s temperature, top_k, top_p and
    min_p, the first token whose cumulative probability passes u[i] of the total (inverse transform)."""
    V, device = logits.size(-1), logits.device
    column = lambda values: torch.tensor(values, device=device)[:, None]  # noqa: E731
    logits = logits.float() / column([p.temperature for p in params])
    top_k = [min(p.top_k or V, V) for p in params]
    if min(top_k) < V or any(p.top_p < 1.0 for p in params):  # both keep the likeliest: one sort for the batch
        ranked, order = logits.sort(-1, descending=True)
        keep = torch.arange(V, device=device) < column(top_k)
        probs = ranked.masked_fill(~keep, -math.inf).softmax(-1)
        # top_p: the smallest prefix whose mass reaches it (at least one token, even when top_p rounds to 0)
        keep &= (probs.cumsum(-1) - probs < column([p.top_p for p in params])).index_fill_(
            1, torch.tensor([0], device=device), True
        )
        # back in the vocabulary's order, where the draw happens: a row's draw never depends on its batch
        logits = logits.masked_fill(~torch.zeros_like(keep).scatter_(-1, order, keep), -math.inf)
    probs = logits.softmax(-1)
    if any(p.min_p > 0.0 for p in params):  # after top_p, as vLLM does; the likeliest token always stays
        probs = probs.masked_fill(probs < column([p.min_p for p in params]) * probs.amax(-1, keepdim=True), 0.0)
    cum = probs.to(torch.float32 if device.type == "mps" else torch.float64).cumsum(-1)  # MPS has no float64
    total = cum[:, -1:]
    target = torch.minimum(u.to(cum)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cum, target, right=True)  # a token of probability 0 is never the first past it
    return picked[:, 0].tolist()


def sample_next_token(logits, params=SamplingParams(), position=0, seen=None, counts=None):
    """One token from (V,) logits, the `position`-th its request generates (seen and counts: see penalized)."""
    logits = penalized(logits, params, seen, counts)
    if params.greedy:
        return int(logits.argmax())
    return draw(logits[None], [params], torch.tensor([uniform(params.seed, position)], dtype=torch.float64))[0]


class Sampler:
    """One request's sampling state: the place of its next token among those it generates (`position`); when
    the repetition penalty is on, a (V,) mask of the ids it has seen, and when a presence or frequency penalty
    is, a (V,) count of the ids it generated, each updated per token (O(V) a step, not O(length)).
    `generated`: tokens it generated before (in an engine that has since been restarted), counted as its own.
    With a grammar, `vocabulary` (model/grammar.py) gives its matcher: `complete` once the output matches whole and
    can go no further, `failed` (why) when it cannot go on."""

    def __init__(self, params, prompt, generated=(), vocabulary=None):
        self.params, self.prompt, self.generated = params, prompt, list(generated)
        self.position = len(self.generated)
        self.seen = self.counts = self.matcher = self.failed = self.prefetched = None
        self.made = self.complete = False
        self.vocabulary = vocabulary
        if params.grammar is not None:
            try:  # the app has checked the grammar: a failure here is the server's (an error, not unsupported_format)
                if vocabulary is None:
                    raise ValueError("this engine was made without the model's tokenizer")
                self.matcher = vocabulary.matcher(params.grammar, self.generated)
                self.complete = vocabulary.ended(self) == "stop"
            except ValueError as e:
                self.failed = f"constrained output failed: {e}"

    @property
    def penalizes(self):
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)

    @property
    def only_argmax(self):
        """Whether the next token is the argmax of the logits alone, with nothing to update: greedy, no penalty."""
        return self.params.greedy and not self.penalizes and self.matcher is None

    def adjust(self, logits):
        """This request's (V,) logits after its penalties."""
        if not self.made:  # on the logits' device, which is known only now
            self.made, p, device = True, self.params, logits.device
            if p.repetition_penalty != 1.0:  # the prompt counts as seen, as in CTRL and transformers
                self.seen = torch.zeros(logits.size(-1), dtype=torch.bool, device=device)
                self.seen[torch.tensor(self.prompt + self.generated, dtype=torch.long, device=device)] = True
            if p.presence_penalty or p.frequency_penalty:  # float32: exact past 256
                self.counts = torch.zeros(logits.size(-1), device=device)
                generated = torch.tensor(self.generated, dtype=torch.long, device=device)
                self.counts.index_put_((generated,), torch.tensor(1.0, device=device), accumulate=True)
        return penalized(logits, self.params, self.seen, self.counts)

    def took(self, token):
        self.position += 1
        if self.matcher is not None and not self.failed:
            self.matcher.consume_token(token)  # a token it refuses leaves it in its error state: DEAD_END
            end = self.vocabulary.ended(self)
            self.complete, self.failed = end == "stop", None if end in (None, "stop") else end
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def __call__(self, logits):
        """The next token id from this request's (V,) logits."""
        return sample([self], logits[None])[0]


def choose(samplers, logits, rows=None):
    """One token for each of samplers, samplers[k]'s from row rows[k] of (B, V) logits (rows: ascending; None for
    0..B-1): the greedy ones by argmax, the others in one batched draw (of their rows only)."""
    rows = range(len(samplers)) if rows is None else rows
    best = logits.argmax(-1).tolist()
    tokens = [best[i] for i in rows]
    drawn = [k for k, s in enumerate(samplers) if not s.params.greedy]
    if drawn:
        u = torch.tensor([uniform(samplers[k].params.seed, samplers[k].position) for k in drawn], dtype=torch.float64)
        every = len(drawn) == len(logits)  # then drawn are rows 0..B-1
        picked = draw(logits if every else logits[[rows[k] for k in drawn]], [samplers[k].params for k in drawn], u)
        for k, token in zip(drawn, picked):
            tokens[k] = token
    return tokens


def sample(samplers, logits):
    """The next token of each row of (B, V) logits, row i for samplers[i] (which counts it): penalties row by row
    where set; the rows under a grammar masked (a copy of those rows only), then each row's token chosen from its
    own logits (see choose: a row's token never depends on its batch, so the two groups apart pick as one would)."""
    if any(s.penalizes for s in samplers):  # else the rows as they are: no (B, V) copy a step
        logits = torch.stack([s.adjust(row) for s, row in zip(samplers, logits)])
    constrained = [i for i, s in enumerate(samplers) if s.matcher is not None and not s.failed]
    free = [i for i, s in enumerate(samplers) if s.matcher is None or s.failed]
    tokens = [None] * len(samplers)
    if constrained:  # tokens outside each one's grammar at -inf (the vocabulary is the engine's, one for all)
        rows = [samplers[i] for i in constrained]
        for i, token in zip(constrained, choose(rows, rows[0].vocabulary.constrain(logits, rows, constrained))):
            tokens[i] = token
    if free:
        for i, token in zip(free, choose([samplers[i] for i in free], logits, free)):
            tokens[i] = token
    for s, token in zip(samplers, tokens):
        s.took(token)
    # their next masks, while the engine's next forward runs; not for those that leave now (max_new_tokens made)
    going = [s for s in samplers if s.matcher is not None and not s.failed and not s.complete]
    going = [s for s in going if s.position < s.params.max_new_tokens]
    if going:
        going[0].vocabulary.prefetch(going)
    return tokens
