"""The character-level LSTM language model that the course compares the GPT against."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt import configure_adamw


class LSTM(nn.Module):
    def __init__(self, vocab_size, hidden_size, n_layer, dropout):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=n_layer, dropout=dropout)
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies dropout between layers only, so the input and output dropouts are ours.
        self.lstm = nn.LSTM(hidden_size, hidden_size, n_layer, dropout=dropout if n_layer > 1 else 0.0,
                            batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def run(self, x, state=None):
        """Logits for x given the carried (h, c) state, and the state after x."""
        h, state = self.lstm(self.drop(self.embedding(x)), state)  # (N, T, D)
        return self.head(self.drop(h)), state  # (N, T, V)

    def forward(self, x, y=None):
        logits, _ = self.run(x)
        if y is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        return configure_adamw(self, weight_decay, learning_rate, betas)

    @torch.no_grad()
    def generate(self, x, max_new_tokens, temperature=1.0):
        """Samples like GPT.generate, carrying the hidden state instead of re-reading a context."""
        was_training = self.training
        self.eval()
        logits, state = self.run(x)
        for i in range(max_new_tokens):
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)
            x = torch.cat([x, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits, state = self.run(nxt, state)
        self.train(was_training)
        return x
