"""The GPT of the course specification: causal self-attention, pre-LN blocks, tied weights.

GPT, Block and the multi-head attention take an optional `kv_cache` (a KVCache): x then holds only
each row's new tokens, whose keys and values go into the cache and which attend to the row's earlier
ones too. Training (no cache) and the serving engine (a cache) run the same layers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.optim import configure_adamw


@dataclass
class KVCache:
    """Keys and values of the tokens a forward has already seen; the caller owns the storage.

    k, v: for GPT.forward, n_layer tensors (a list, or one tensor stacked on dim 0) of (rows, nh,
    context_size, hs); a Block or the attention gets one layer's (GPT.forward hands each block `layer(i)`).
    Written in place. The batch is rows 0..N-1; storage may hold more rows, which the forward leaves alone.
    lengths: (N,) long, the tokens each row holds; a forward's T new tokens go at lengths .. lengths + T - 1.
    longest: how many cached positions the attention reads, as a Python int so that sizing the attention
    never waits on the device: max(lengths), or up to context_size - T, which gives every step the same
    shapes (positions past a row's length are masked either way).
    last: optional (N,) long, for each row the one of its T new tokens whose logits the caller wants (a prefill
    samples only after a prompt's last token): GPT.forward then returns (N, 1, V), not (N, T, V) logits.
    One KVCache serves one forward: what all its layers need is worked out once (`where`).
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    longest: int
    last: torch.Tensor | None = None

    def __post_init__(self):
        self._shared = {}  # where(T), worked out by the first layer and read by the others

    def layer(self, i):
        view = KVCache(self.k[i], self.v[i], self.lengths, self.longest)
        view._shared = self._shared
        return view

    def where(self, T):
        """For T new tokens a row: rows (N, 1) and positions (N, T) to store them at, and which of the
        longest + T positions each new token sees, (N, 1, T, longest + T); None when all rows start empty."""
        if T not in self._shared:
            device = self.lengths.device
            rows = torch.arange(len(self.lengths), device=device)[:, None]
            at = self.lengths[:, None] + torch.arange(T, device=device)
            visible = None
            if self.longest:  # rows differ in length: a token sees up to its own position, not the stale rest
                visible = (torch.arange(self.longest + T, device=device) <= at[:, :, None])[:, None]
            self._shared[T] = rows, at, visible
        return self._shared[T]


class CausalSelfAttention(nn.Module):
    """Single-head attention: Y = softmax(QK^T / sqrt(D)) V, scores for j > i masked out."""

    def __init__(self, hidden_size):
        super().__init__()
        self.W_Q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_K = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_V = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.W_Q(x), self.W_K(x), self.W_V(x)  # (N, T, D)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (N, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return F.softmax(scores, dim=-1) @ v  # (N, T, D)


class MultiHeadCausalSelfAttention(nn.Module):
    def __init__(self, hidden_size, n_head, dropout):
        super().__init__()
        if hidden_size % n_head != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        # The fused kernel computes the same function; the explicit path is kept as its reference.
        self.fused = True

    def forward(self, x, kv_cache=None):
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.n_head, D // self.n_head)
        visible = None  # None: causal over these T tokens alone
        if kv_cache is not None:
            rows, at, visible = kv_cache.where(T)
            # each row's new keys and values, (N, T, nh, hs), at the row's own positions
            kv_cache.k[rows, :, at], kv_cache.v[rows, :, at] = qkv[:, :, 1], qkv[:, :, 2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, nh, T, hs) each
        if visible is not None:  # the new tokens see the cached ones too
            Tk = visible.size(-1)
            k, v = kv_cache.k[:N, :, :Tk], kv_cache.v[:N, :, :Tk]  # (N, nh, Tk, hs): the batch's rows
        # Compiled over a cache (the engine's decode step), the explicit form: inductor fuses it into kernels of
        # its own, where the library's fused kernel stays a call that costs more than its arithmetic for a
        # token or a few (about 30 us against 9 a layer for the bundled GPT at batch 1 on a CPU).
        if self.fused and not (kv_cache is not None and torch.compiler.is_compiling()):
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p, is_causal=visible is None)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (N, nh, T, Tk)
            if visible is None:
                visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = self.attn_dropout(F.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1))
            y = att @ v  # (N, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(N, T, D)
        return self.resid_dropout(self.proj(y))


# GELU forms: the course's exact (erf) GELU, or GPT-2's tanh approximation (imported GPT-2 checkpoints).
GELU_FORMS = {"exact": "none", "tanh": "tanh"}  # -> nn.GELU's `approximate`


class MLP(nn.Module):
    def __init__(self, hidden_size, dropout, gelu="exact"):
        super().__init__()
        if gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {', '.join(GELU_FORMS)}, not {gelu!r}")
        self.fc = nn.Linear(hidden_size, 4 * hidden_size)
        self.gelu = nn.GELU(approximate=GELU_FORMS[gelu])
        self.proj = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, hidden_size, n_head, dropout, gelu="exact"):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden_size)
        self.attn = MultiHeadCausalSelfAttention(hidden_size, n_head, dropout)
        self.ln2 = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, dropout, gelu)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln1(x), kv_cache=kv_cache)
        return x + self.mlp(self.ln2(x))


@dataclass(frozen=True)
class GPTConfig:
    """The GPT's shape: GPT's constructor arguments, saved as JSON in every checkpoint."""

    vocab_size: int
    context_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    dropout: float
    gelu: str = "exact"  # or "tanh"; checkpoints written before this field are exact


class GPT(nn.Module):
    def __init__(self, vocab_size, context_size, hidden_size, n_layer, n_head, dropout, gelu="exact"):
        super().__init__()
        self.config = GPTConfig(vocab_size, context_size, hidden_size, n_layer, n_head, dropout, gelu)
        self.context_size = context_size
        self.tok_emb = nn.Embedding(vocab_size, hidden_size)
        self.pos_emb = nn.Embedding(context_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_size, n_head, dropout, gelu) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix, two uses
        self.apply(self._init_weights)
        # GPT-2's scaling: each residual branch's output layer shrinks with depth.
        for block in self.blocks:
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x, y=None, kv_cache=None):
        N, T = x.shape
        held = 0 if kv_cache is None else kv_cache.longest
        if held + T > self.context_size:
            raise ValueError(f"sequence length {held + T} exceeds context_size {self.context_size}")
        pos = torch.arange(T, device=x.device) if kv_cache is None else kv_cache.where(T)[1]  # (T,) or (N, T)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))  # (N, T, D)
        for i, block in enumerate(self.blocks):
            h = block(h, kv_cache=None if kv_cache is None else kv_cache.layer(i))
        if kv_cache is not None and kv_cache.last is not None:
            h = h[torch.arange(N, device=h.device), kv_cache.last][:, None]  # (N, 1, D): the only logits wanted
        logits = self.lm_head(self.ln_f(h))  # (N, T, V)
        if y is None:
            return logits, None
        # reshape, not view: targets are often a strided slice such as x[:, 1:]
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        return configure_adamw(self, weight_decay, learning_rate, betas)

    @torch.no_grad()
    def generate(self, x, max_new_tokens, temperature=1.0):
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(x[:, -self.context_size :])
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            x = torch.cat([x, torch.multinomial(probs, num_samples=1)], dim=1)
        self.train(was_training)
        return x
