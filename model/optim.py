"""The optimizer both models train with."""

import torch


def configure_adamw(model, weight_decay, learning_rate, betas):
    """AdamW with matrices (and embeddings) decayed, biases and LayerNorm gains not."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
