"""Quill's models, tokenizers and checkpoint I/O."""

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, MultiHeadCausalSelfAttention
from model.lstm import LSTM, LSTMConfig
from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

__all__ = [
    "CausalSelfAttention",
    "MultiHeadCausalSelfAttention",
    "MLP",
    "Block",
    "GPT",
    "GPTConfig",
    "LSTM",
    "LSTMConfig",
    "CharTokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointError",
]
