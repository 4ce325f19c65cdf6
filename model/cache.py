"""Where the engine keeps each row's state between steps: the GPT's KV cache (GPTCache) and the LSTM's carried
(h, c) (LSTMState). Both hand the model's own forward views of preallocated storage, one row per slot; the
engine (model/engine.py) decides which request holds which slot."""

import logging
import math

import torch

from model.compiled import CompiledSteps
from model.gpt import GPT, KVCache

log = logging.getLogger("quill")


REUSED = 16  # tokens: a shorter prefix held by a row is computed again rather than copied
LEADER = 64  # tokens: a prefix that prompts prefilled together share is computed once (a forward of its own)


def window_start(prompt_length, length, context):
    """Where the row of a request holding `length` tokens (its prompt's first) starts, by the sliding window of
    model/engine.py's docstring: what a restarted request prefills, so that it reads what it read before."""
    start = max(0, prompt_length - context)
    for n in range(prompt_length + 1, length + 1):
        if n - start > context:
            start = n - (context // 2 + 1)
    return start


def batch_buckets(max_batch):
    """The batch sizes a compiled decode step is built for: the powers of two and the halfway sizes between
    them (1, 2, 3, 4, 6, 8, 12, ...) below max_batch, and max_batch. A step pads its batch to the next one
    built: at most a third of a step's rows are padding (17 streams compute 24 rows, not 32), for twice
    the handful of fixed shapes that powers of two alone would compile."""
    sizes, p = [1], 2
    while p < max_batch:
        sizes += [n for n in (p, p + p // 2) if n < max_batch]
        p *= 2
    return sizes + [max_batch] if max_batch > 1 else sizes


class GPTCache:
    """Storage for the GPT's cached forward: preallocated keys and values for max_batch rows, one tensor
    per layer, and a length per row. The model reads and writes them (GPT.forward's kv_cache); this class
    only slots them. With `compiled`, decode steps run a step compiled ahead of time (model/compiled.py)
    for each batch size in batch_buckets, a batch padded to the next one built (eagerly while none is);
    its attention reads the first max(length) + 1 positions, masked past each row's length. Packages are
    kept in `compile_folder`, and compiled in the background from `weights` (the model's checkpoint file)
    when there is one. Prefills stay eager."""

    def __init__(self, model: GPT, max_batch, compiled=False, compile_folder=None, weights=None, reuse=True):
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
        self.held = [[] for _ in range(max_batch)]  # the tokens whose keys and values each row holds (prefill)
        self.reuse = reuse  # prefixes that rows hold: copied (prefill), or always computed
        self.buckets = batch_buckets(max_batch)
        self.step = CompiledSteps(model, self.k, self.v, compile_folder, weights) if compiled else None

    def room(self, slot):
        return self.context - self.length[slot]

    def prefill(self, first, seqs):
        """Fill rows first.., one with each of `seqs` (token id lists of at most context_size, any lengths), and
        return the logits after each one's last token, (N, V): the only ones computed (a prompt's others would be
        T x V floats). A row starts from the longest prefix of its tokens, REUSED or more, that a row holds (a
        running request's, or a finished one's: a free row keeps its keys and values until something overwrites
        them), copied; a prefix of LEADER or more that several of `seqs` share is computed once, in a forward of
        its own, first. Then one forward computes the rest of every row: a shorter one is padded at its end, and
        what the padding writes lies past the row's length, where no later token looks and the next ones
        overwrite it."""
        fill = list(range(first, first + len(seqs)))
        plan, leaders = self._plan(first, seqs)
        # every row takes as many new tokens as the one with the most (padding): no row's may then pass the context
        most = max(len(ids) - n for ids, (_, n, _) in zip(seqs, plan))
        plan = [(source, min(n, self.context - most), lead) for source, n, lead in plan]
        self._copy({row: (source, n) for row, (source, n, lead) in zip(fill, plan) if n and not lead})
        for row in fill:
            self.held[row] = []  # until the forwards below have written it
        for row in leaders:
            ids = seqs[row - first][:-1]
            self.length[row] = 0
            self._forward(row, [ids], torch.tensor([len(ids) - 1], device=self.device))
        self._copy({row: (source, n) for row, (source, n, lead) in zip(fill, plan) if n and lead and source != row})
        shared = [n for _, n, _ in plan]
        self.length[first : first + len(seqs)] = shared
        todo = [ids[n:] for ids, n in zip(seqs, shared)]
        last = torch.tensor([len(ids) - 1 for ids in todo], device=self.device)
        logits = self._forward(first, [ids + [0] * (most - len(ids)) for ids in todo], last)
        self.length[first : first + len(seqs)] = [len(ids) for ids in seqs]
        for row, ids in zip(fill, seqs):
            self.held[row] = list(ids)
        return logits[:, 0]

    def _plan(self, first, seqs):
        """For each of seqs, to fill rows first.. (see prefill): (the row to take its prefix from, how many tokens,
        whether that row is a leader), or (None, 0, False); and the leaders, rows computed first (all but their
        last token), whose prefix others take. A leader's own is (itself, its length - 1, True)."""
        held = [r for r in range(len(self.held)) if len(self.held[r]) >= REUSED]  # what they hold now: copied first
        table = [self.held[r] for r in held] + [ids[:-1] for ids in seqs]  # then what each of seqs would lead with
        width = min(max(map(len, seqs)) - 1, max(map(len, table)))
        plan, leaders = [(None, 0, False)] * len(seqs), []
        if width < REUSED or not self.reuse:
            return plan, leaders
        table = torch.tensor([(ids[:width] + [-1] * width)[:width] for ids in table])  # -1 matches no token
        base = len(held)
        for i, ids in enumerate(seqs):
            n = min(len(ids) - 1, width)  # the last token is always computed: its logits are the point
            if n < REUSED:
                continue
            same = (table[: base + i, :n] == torch.tensor(ids[:n])).int().cumprod(1).sum(1).tolist()
            kept = max(range(base), key=same.__getitem__, default=None)
            lead = max(range(base, base + i), key=same.__getitem__, default=None)
            kept_n = 0 if kept is None else same[kept]
            if lead is not None and same[lead] >= LEADER and same[lead] > kept_n:
                row = first + lead - base
                if row not in leaders:
                    leaders.append(row)
                    plan[lead - base] = (row, len(seqs[lead - base]) - 1, True)
                plan[i] = (row, same[lead], True)
            elif kept_n >= REUSED:
                plan[i] = (held[kept], kept_n, False)
        return plan, leaders

    def _copy(self, sources):
        """Copy into each row its prefix from another: {row: (source row, tokens)}. Every source is read before any
        row is written: a row may be one's source and another's target."""
        groups = {}
        for row, source in sources.items():
            groups.setdefault(source, []).append(row)
        read = {
            key: [(k[key[0], :, : key[1]].clone(), v[key[0], :, : key[1]].clone()) for k, v in zip(self.k, self.v)]
            for key in groups
        }
        for (source, n), rows in groups.items():
            to = torch.tensor(rows, device=self.device)
            for k, v, (k_read, v_read) in zip(self.k, self.v, read[source, n]):
                k[to, :, :n], v[to, :, :n] = k_read, v_read

    def decode(self, ids):
        """Append one token to each of rows 0..B-1 and return their next-token logits (B, V)."""
        B = len(ids)
        for row, token in enumerate(ids):
            self.held[row].append(token)
        built = self.step.runs if self.step else ()
        n = next((b for b in self.buckets if b >= B and b in built), None)
        if n is None:
            return self._forward(0, [[t] for t in ids])[:, -1]
        held = self.length[:B]
        # rows B..n-1 are free slots: they compute a junk token at position 0, which a prefill overwrites. Tokens
        # and lengths go to the device in one copy, each starting 16-byte aligned (as the compiled step assumes)
        self.held[B:n] = [[] for _ in range(B, n)]
        pad = [0] * (n - B + n % 2)
        both = torch.tensor([ids + pad, held + pad], device=self.device)
        logits = self.step(both[0, :n].view(n, 1), both[1, :n], max(held))[:B]
        self.length[:B] = [h + 1 for h in held]
        return logits

    def compiled_sizes(self):
        """(batch sizes whose compiled step is built, those planned), or None when decoding eagerly only."""
        if self.step is None or self.step.failed:
            return None
        return sorted(self.step.runs), self.buckets

    @torch.no_grad()
    def warm_up(self, on_built=None, background=False, threads=None):
        """Compile (or load) the step for every bucket: here and now, or in the background (from the weights
        file, with `threads` torch threads) while decoding eagerly. `on_built(sizes)` after each. If that
        fails, say so in one line and decode eagerly: a slower server, never a broken one."""
        if self.step is None:
            return
        if background and self.step.weights:
            return self.step.build_in_background(self.buckets, threads, on_built)
        try:
            self.step.build(self.buckets, on_built)
        except Exception as e:  # inductor's messages run to many lines: the first says what failed
            self.step.fail(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")

    def stop(self):
        if self.step:
            self.step.stop()

    def _forward(self, first, ids, last=None):
        """The model's forward over rows first.. with ids (N, T) as their new tokens; logits (N, T, V), or
        (N, 1, V) at each row's position `last` (see KVCache)."""
        rows = slice(first, first + len(ids))
        held = self.length[rows]
        lengths = torch.tensor(held, device=self.device)
        cache = KVCache([k[rows] for k in self.k], [v[rows] for v in self.v], lengths, max(held), last)  # views
        logits, _ = self.model(torch.tensor(ids, device=self.device), kv_cache=cache)
        self.length[rows] = [n + len(ids[0]) for n in held]
        return logits

    def move(self, src, dst):
        for k, v in zip(self.k, self.v):
            k[dst], v[dst] = k[src], v[src]
        self.length[dst] = self.length[src]
        self.held[dst] = list(self.held[src])


class LSTMState:
    """Storage for the LSTM's carried (h, c) of max_batch rows: no context limit, nothing to slide."""

    context = None
    step = None  # no compiled step

    def __init__(self, model, max_batch):
        self.model = model
        self.h, self.c = model.zero_state(max_batch)  # (n_layer, max_batch, D) each

    def room(self, slot):
        return math.inf

    def warm_up(self, on_built=None, background=False, threads=None):
        pass  # nothing to compile

    def compiled_sizes(self):
        return None

    def stop(self):
        pass

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
