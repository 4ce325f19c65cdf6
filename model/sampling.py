"""How a request wants its tokens chosen (SamplingParams) and the sampler that reads it.

The request bodies convert themselves into a SamplingParams once; the object travels whole
through the engine to the request's Sampler, so a new sampling knob is added here, in the
protocol and in the playground, and nowhere else (the engine only calls `req.sampler(logits)`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    @property
    def greedy(self):
        return self.temperature < MIN_TEMPERATURE


def penalize(logits, seen, penalty):
    """(V,) logits with each token marked in `seen` ((V,) bool: prompt and output so far) made less likely."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next_token(logits, generator, params=SamplingParams(), seen=None, counts=None):
    """One token from (V,) logits. `seen`: a (V,) bool mask of the ids the request has seen, needed
    only when params.repetition_penalty != 1; `counts`: (V,) how often each id was generated, needed
    only when a presence or frequency penalty is set."""
    if params.repetition_penalty != 1.0:
        logits = penalize(logits, seen, params.repetition_penalty)
    if counts is not None:  # OpenAI's formula: generated tokens only, not the prompt; in float32, where a small
        # penalty still moves a large logit (bfloat16 would round 20.0 - 0.06 back to 20.0)
        logits = logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.greedy:
        return int(logits.argmax())
    logits = (
        logits.float() / params.temperature
        if logits.dtype in (torch.float16, torch.bfloat16)
        else logits / params.temperature
    )
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[0] = False  # even when top_p rounds to 0 in the logits' precision (5e-324 does in float32)
        probs = probs.scatter(0, order[drop], 0.0)
    if params.min_p > 0.0:  # after top_p, as vLLM does; the likeliest token always stays
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    # (1, V) consumes the generator exactly as GPT.generate's batched call does for one row
    return int(torch.multinomial(probs.unsqueeze(0), 1, generator=generator))


class Sampler:
    """One request's sampling state: its generator, seeded from params.seed; when the repetition
    penalty is on, a (V,) mask of the ids it has seen, and when a presence or frequency penalty is, a (V,)
    count of the ids it generated, each updated per token (O(V) a step, not O(length))."""

    def __init__(self, params, prompt):
        self.params, self.prompt = params, prompt
        self.generator = self.seen = self.counts = None

    @property
    def only_argmax(self):
        """Whether the next token is the argmax of the logits alone, with nothing to update: greedy, no penalty."""
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and not (p.presence_penalty or p.frequency_penalty)

    def __call__(self, logits):
        """The next token id from this request's (V,) logits."""
        if self.generator is None:  # made on the logits' device, which is known only now
            self.generator = torch.Generator(logits.device).manual_seed(self.params.seed)
            if self.params.repetition_penalty != 1.0:  # the prompt counts as seen, as in CTRL and transformers
                self.seen = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
                self.seen[torch.tensor(self.prompt, dtype=torch.long, device=logits.device)] = True
            if self.params.presence_penalty or self.params.frequency_penalty:
                self.counts = torch.zeros(logits.size(-1), device=logits.device)  # float32: exact past 256
        token = sample_next_token(logits, self.generator, self.params, self.seen, self.counts)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token
