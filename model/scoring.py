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


def top_logprobs(logprobs, k):
    """The k likeliest tokens of each row of (T, V) log-probabilities: one ((id, logprob), ...) per row."""
    if not k:
        return [()] * logprobs.size(0)
    top = logprobs.topk(min(k, logprobs.size(-1)))
    return [tuple(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]


@torch.no_grad()
def score_prompt(model, context, ids, k):
    """PromptLogprobs for `ids`, from the model's plain forward, read as the trainer reads text: a window of
    `context` tokens scores the `context` tokens after its first, so up to context + 1 tokens the sum is the
    trainer's loss on them. Past that, windows start every context // 2 and score only tokens not yet scored,
    each seeing at least half a context before it. The LSTM (context None) reads it whole."""
    device = next(model.parameters()).device
    logprobs, tops = [None], [()]
    start = 0
    while len(logprobs) < len(ids):
        end = len(ids) - 1 if context is None else min(start + context, len(ids) - 1)  # the inputs: ids[start:end]
        logits, _ = model(torch.tensor([ids[start:end]], device=device))
        # row j predicts ids[start + j + 1]; rows of tokens an earlier window scored are skipped
        rows = torch.log_softmax(logits[0, len(logprobs) - 1 - start :].float(), dim=-1)
        targets = torch.tensor(ids[len(logprobs) : end + 1], device=device)
        tops += top_logprobs(rows, k)
        logprobs += rows.gather(1, targets[:, None])[:, 0].tolist()
        start += max(1, context // 2) if context else 0
    return PromptLogprobs(logprobs, tops)
