"""Log-probabilities from a model's own distribution: the likeliest tokens of each position, and a prompt
scored token by token as the trainer reads text. The engine reports them (SamplingParams.logprobs and
prompt_logprobs); they never change what is sampled."""

from dataclasses import dataclass, field

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


@dataclass(eq=False)  # one scoring is itself alone
class Scoring:
    """One prompt's scoring under way, shared by every request that asked for it (the n choices of a prompt).

    Read as the trainer reads text: a window of `context` tokens scores the `context` tokens after its first,
    so up to context + 1 tokens the sum is the trainer's loss on them. Past that, windows start every
    context // 2 and score only tokens not yet scored, each seeing at least half a context before it. The LSTM
    (context None) reads the prompt whole, LSTM_CHUNK tokens at a time, its state carried from one to the next."""

    key: tuple  # (prompt ids, prompt_logprobs: the likeliest tokens to report at each position)
    context: int | None
    reqs: list = field(default_factory=list)
    logprobs: list = field(default_factory=lambda: [None])  # nothing predicts the first token
    tops: list = field(default_factory=lambda: [()])
    start: int = 0  # the next window's first input
    state: tuple | None = None  # the LSTM's (h, c) after ids[:start]

    @property
    def ids(self):
        return self.key[0]

    def window(self):
        """(start, end): the next forward's inputs are ids[start:end]."""
        step = LSTM_CHUNK if self.context is None else self.context
        return self.start, min(self.start + step, len(self.ids) - 1)

    @property
    def done(self):
        return len(self.logprobs) == len(self.ids)

    def take(self, logits):
        """Read the (T, V) logits of the window's inputs."""
        start, end = self.window()
        # row j predicts ids[start + j + 1]; rows of tokens an earlier window scored are skipped
        rows = torch.log_softmax(logits[len(self.logprobs) - 1 - start :].float(), dim=-1)
        targets = torch.tensor(self.ids[len(self.logprobs) : end + 1], device=logits.device)
        self.tops += top_logprobs(rows, self.key[1])
        self.logprobs += rows.gather(1, targets[:, None])[:, 0].tolist()
        self.start = end if self.context is None else start + max(1, self.context // 2)

    def result(self):
        return PromptLogprobs(self.logprobs, self.tops)


def together(jobs, budget):
    """The first of `jobs` that one forward of at most `budget` padded tokens can advance (at least one)."""
    group, longest = [], 0
    for job in jobs:
        start, end = job.window()
        longest = max(longest, end - start)
        if group and (len(group) + 1) * longest > budget:
            break
        group.append(job)
    return group


def score_step(model, jobs):
    """Advance each of `jobs` (Scorings of one model) by one window, all in one forward; return those whole
    (a one-token prompt is whole at once). The windows are right-padded to the longest: the GPT's attention
    is causal, so no token sees the padding after it; the LSTM's states are stacked, and as every window but
    a prompt's last is LSTM_CHUNK long, only a last window is padded, whose state is not kept."""
    whole = [job for job in jobs if job.done]
    jobs = [job for job in jobs if not job.done]
    if not jobs:
        return whole
    device = next(model.parameters()).device
    spans = [job.window() for job in jobs]
    x = torch.zeros(len(jobs), max(end - start for start, end in spans), dtype=torch.long)
    for row, (job, (start, end)) in enumerate(zip(jobs, spans)):
        x[row, : end - start] = torch.tensor(job.ids[start:end])
    with torch.no_grad():
        if jobs[0].context is None:
            states = [job.state or model.zero_state(1) for job in jobs]
            state = tuple(torch.cat(parts, dim=1) for parts in zip(*states))  # (n_layer, B, D) each
            logits, _ = model(x.to(device), state=state)
            for row, job in enumerate(jobs):
                job.state = tuple(s[:, row : row + 1].clone() for s in state)
        else:
            logits, _ = model(x.to(device))
    for row, (job, (start, end)) in enumerate(zip(jobs, spans)):
        job.take(logits[row, : end - start])
    return whole + [job for job in jobs if job.done]


def score_prompt(model, context, ids, k):
    """PromptLogprobs for `ids` in one go: one Scoring stepped to its end."""
    job = Scoring((tuple(ids), k), context)
    while not job.done:
        score_step(model, [job])
    return job.result()
