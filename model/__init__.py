"""Quill's models, tokenizers and checkpoint I/O."""

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.gpt import GPT, MLP, Block, CausalSelfAttention, MultiHeadCausalSelfAttention
from model.lstm import LSTM
from model.tokenizer import ByteTokenizer, CharTokenizer

__all__ = [
    "CausalSelfAttention",
    "MultiHeadCausalSelfAttention",
    "MLP",
    "Block",
    "GPT",
    "LSTM",
    "CharTokenizer",
    "ByteTokenizer",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointError",
]
