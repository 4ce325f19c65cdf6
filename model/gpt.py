"""The GPT of the course specification: causal self-attention, pre-LN blocks, tied weights."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(N, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (N, nh, T, hs)
        if self.fused:
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (N, nh, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = self.attn_dropout(F.softmax(scores.masked_fill(future, float("-inf")), dim=-1))
            y = att @ v  # (N, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(N, T, D)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, hidden_size, dropout):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 4 * hidden_size)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, hidden_size, n_head, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden_size)
        self.attn = MultiHeadCausalSelfAttention(hidden_size, n_head, dropout)
        self.ln2 = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, context_size, hidden_size, n_layer, n_head, dropout):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, context_size=context_size, hidden_size=hidden_size,
                           n_layer=n_layer, n_head=n_head, dropout=dropout)
        self.context_size = context_size
        self.tok_emb = nn.Embedding(vocab_size, hidden_size)
        self.pos_emb = nn.Embedding(context_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_size, n_head, dropout) for _ in range(n_layer))
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

    def forward(self, x, y=None):
        N, T = x.shape
        if T > self.context_size:
            raise ValueError(f"sequence length {T} exceeds context_size {self.context_size}")
        pos = torch.arange(T, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))  # (N, T, D)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.ln_f(h))  # (N, T, V)
        if y is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        return configure_adamw(self, weight_decay, learning_rate, betas)

    @torch.no_grad()
    def generate(self, x, max_new_tokens, temperature=1.0):
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(x[:, -self.context_size:])
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            x = torch.cat([x, torch.multinomial(probs, num_samples=1)], dim=1)
        self.train(was_training)
        return x


def configure_adamw(model, weight_decay, learning_rate, betas):
    """AdamW with matrices (and embeddings) decayed, biases and LayerNorm gains not."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
