"""The character-level LSTM language model that the course compares the GPT against."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.optim import configure_adamw


@dataclass(frozen=True)
class LSTMConfig:
    """The LSTM's shape: its constructor arguments, saved as JSON in every checkpoint."""

    vocab_size: int
    hidden_size: int
    n_layer: int
    dropout: float


class LSTM(nn.Module):
    def __init__(self, vocab_size, hidden_size, n_layer, dropout):
        super().__init__()
        self.config = LSTMConfig(vocab_size, hidden_size, n_layer, dropout)
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies dropout between layers only, so the input and output dropouts are ours.
        self.lstm = nn.LSTM(
            hidden_size, hidden_size, n_layer, dropout=dropout if n_layer > 1 else 0.0, batch_first=True
        )
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, y=None, state=None):
        """Logits (N, T, V) and the loss against y (None without y).

        state: optional (h, c), each (n_layer, N, D): the state before x (zeros when None), overwritten
        in place with the state after x, so that a caller (generate, the engine) can carry it on.
        """
        # nn.LSTM wants contiguous states, and an engine passes a strided view of its storage
        before = None if state is None else tuple(s.contiguous() for s in state)
        h, after = self.lstm(self.drop(self.embedding(x)), before)  # (N, T, D)
        if state is not None:
            for old, new in zip(state, after):
                old.copy_(new)
        logits = self.head(self.drop(h))  # (N, T, V)
        if y is None:
            return logits, None
        # reshape, not view: targets are often a strided slice such as x[:, 1:]
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def zero_state(self, n):
        """A fresh (h, c) for n rows, for forward's `state`."""
        p = self.head.weight
        shape = (self.config.n_layer, n, self.config.hidden_size)
        return torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        return configure_adamw(self, weight_decay, learning_rate, betas)

    @torch.no_grad()
    def generate(self, x, max_new_tokens, temperature=1.0):
        """Samples like GPT.generate, carrying the hidden state instead of re-reading a context."""
        was_training = self.training
        self.eval()
        state = self.zero_state(x.size(0))
        logits, _ = self(x, state=state)
        for i in range(max_new_tokens):
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)
            x = torch.cat([x, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits, _ = self(nxt, state=state)
        self.train(was_training)
        return x
