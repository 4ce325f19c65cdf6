"""Log-probabilities from a model's own distribution: the likeliest tokens of each position, and a prompt
scored token by token as the trainer reads text. The engine reports them (SamplingParams.logprobs and
prompt_logprobs); they never change what is sampled."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptLogprobs:
    """With params.prompt_logprobs, sent before any Token: each prompt token's log-probability given the
    ones before it (None for the first) and the likeliest tokens there, as Token has them."""

    logprobs: list
    top: list


@dataclass
class Scoring:
    """One prompt's scoring under way, shared by every request that asked for it (the n choices of a prompt)."""

    key: tuple  # (prompt, prompt_logprobs)
    windows: object  # score_windows' generator
    reqs: list


def top_logprobs(logprobs, k):
    """The k likeliest tokens of each row of (T, V) log-probabilities: one ((id, logprob), ...) per row."""
    if not k:
        return [()] * logprobs.size(0)
    top = logprobs.topk(min(k, logprobs.size(-1)))
    return [tuple(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]


def token_logprobs(reqs, rows, logits, tokens):
    """{row i: (log-probability of tokens[i], its likeliest tokens as top_logprobs gives them)} for the `rows` of
    (R, V) logits whose request (reqs[i]) asked for logprobs, from the model's own distribution (before temperature
    and penalties): read back in one copy for all rows, not three a row."""
    asked = [i for i in rows if reqs[i].params.logprobs is not None]
    if not asked:
        return {}
    ks = [reqs[i].params.logprobs for i in asked]
    logprobs = torch.log_softmax(logits[asked].float(), dim=-1)
    k = min(max(ks), logprobs.size(-1))
    parts = [logprobs.gather(1, torch.tensor([tokens[i] for i in asked], device=logits.device)[:, None])]
    if k:
        top = logprobs.topk(k)
        parts += [top.values, top.indices]
    got = torch.cat([part.double() for part in parts], 1).tolist()  # ids are exact in float64
    tops = [tuple(zip(map(int, row[1 + k : 1 + k + n]), row[1 : 1 + n])) for row, n in zip(got, ks)]
    return {i: (row[0], top) for i, row, top in zip(asked, got, tops)}


LSTM_CHUNK = 512  # prompt tokens an LSTM scores in one forward, its state carried to the next


def score_prompt(model, context, ids, k):
    """PromptLogprobs for `ids` in one go: score_windows run to its end."""
    windows = score_windows(model, context, ids, k)
    while True:
        try:
            next(windows)
        except StopIteration as done:
            return done.value


def score_windows(model, context, ids, k):
    """Score `ids` one forward at a time, yielding after each (the engine steps its other requests between
    them), and return their PromptLogprobs. Read as the trainer reads text: a window of `context` tokens scores
    the `context` tokens after its first, so up to context + 1 tokens the sum is the trainer's loss on them.
    Past that, windows start every context // 2 and score only tokens not yet scored, each seeing at least
    half a context before it. The LSTM (context None) reads it whole, LSTM_CHUNK tokens at a time."""
    device = next(model.parameters()).device
    logprobs, tops = [None], [()]
    state = model.zero_state(1) if context is None else None
    start = 0
    while len(logprobs) < len(ids):
        if context is None:  # ids[start:end] after the state of ids[:start]
            end = min(start + LSTM_CHUNK, len(ids) - 1)
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[start:end]], device=device), state=state)
        else:  # the inputs: ids[start:end]
            end = min(start + context, len(ids) - 1)
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[start:end]], device=device))
        # row j predicts ids[start + j + 1]; rows of tokens an earlier window scored are skipped
        rows = torch.log_softmax(logits[0, len(logprobs) - 1 - start :].float(), dim=-1)
        targets = torch.tensor(ids[len(logprobs) : end + 1], device=device)
        tops += top_logprobs(rows, k)
        logprobs += rows.gather(1, targets[:, None])[:, 0].tolist()
        start = end if context is None else start + max(1, context // 2)
        if len(logprobs) < len(ids):
            yield
    return PromptLogprobs(logprobs, tops)
