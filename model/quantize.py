"""Int8 weight-only quantization for serving (QUILL_QUANTIZE=int8): every nn.Linear's weight of a GPT stored as
int8 with a scale per output channel (symmetric: w ~ q * scale, q in -127..127, scale = max |w| of the row / 127),
applied once after the weights are loaded and cast (quantize); activations, biases, layer norms, the embeddings
and the KV cache keep the model's dtype. llama.cpp's q8_0 is its counterpart (int8, a scale every 32 weights).

The tied lm_head is quantized too, as a copy of its own: the token embedding stays in the model's dtype (a lookup
reads one row of it a token, so its size costs nothing a step), and lm_head is the largest matrix a step reads
(GPT-2 small: 38.6M of its 124M parameters). Where the int8 copy does not pay (the forwards of more than
HEAD_ROWS rows, below) the head multiplies by the embedding itself, still tied to it (`dense`): the head's int8
weight is used at decode batch sizes up to HEAD_ROWS only. Set HEAD = False to keep it tied and unquantized.

No library kernel pays here (docs/bench-int8-kernels.md, torch 2.13 on this CPU): torch._weight_int8pack_mm is
2-3x slower than float32's F.linear at one row and 15-20x at 32, and torchao's int8 weight-only (which dequantizes
the weight to float, then multiplies) is slower at one row. What pays at batch 1 is inductor's code: the product
written as a reduction, (x[:, None, :] * q.to(x.dtype)).sum(-1) * scale, compiles to one loop that reads each int8
weight once and converts it in registers: 1.5-1.8x float32's F.linear at one row, and GPT-2 small's compiled
batch-1 step 1.7x float32's (docs/bench-int8-decode.md). It is the compiled decode step's (model/compiled.py) form
for up to GEMV_ROWS rows (the head: HEAD_ROWS); more rows, and every eager forward (prefills, decoding before the
step is built or with QUILL_COMPILE=0), dequantize the weight and call F.linear: about float32's speed compiled,
0.7x eagerly at one row (the head: the float embedding's own F.linear, float32's speed).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE = ("int8",)  # the values QUILL_QUANTIZE (and model.compiled's --quantize) take, besides none
HEAD = True  # quantize the tied lm_head (as an untied int8 copy)
GEMV_ROWS = 8  # rows (batch x tokens) up to which a compiled forward uses the reduction form
HEAD_ROWS = 4  # ... the head's (past 4 rows its float matrix is faster: 1.15x float32 at 4, 0.85x at 8)


def check(quantize):
    """`quantize` as a setting: None (or "", "none"), or one of QUANTIZE; else a ValueError saying what is."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r} is not one of none, {', '.join(QUANTIZE)}")
    return quantize


def quantize_rows(w):
    """(int8 weight, float32 scale per row): symmetric, per output channel."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """nn.Linear's forward over an int8 weight (a buffer, `weight`, (out, in)) and a scale per output (`scale`).
    With `dense` (the linear layer's own float weight, kept: the tied lm_head's), forwards that do not take the
    reduction form multiply by it instead."""

    def __init__(self, linear: nn.Linear, dense=False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        dtype = linear.weight.dtype
        self.register_buffer("weight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(device=linear.weight.device, dtype=dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.dense = linear.weight if dense else None  # the same Parameter: tied as it was

    def forward(self, x):
        rows = GEMV_ROWS if self.dense is None else HEAD_ROWS
        if torch.compiler.is_compiling() and x.numel() <= rows * self.in_features:
            # x stored, not recomputed for every output (inductor would inline a layer norm or an embedding lookup
            # into the loop below): as_strided's lowering realizes its input
            x = torch.as_strided(x, x.size(), x.stride())
            y = (x[..., None, :] * self.weight.to(x.dtype)).sum(-1) * self.scale  # one loop over the int8 weight
        elif self.dense is not None:
            y = F.linear(x, self.dense)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def dequantized(self):
        """The float weight this layer multiplies by, (out, in)."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@torch.no_grad()
def quantize(model, how):
    """Quantize `model`'s linear layers in place, as `how` says (check's values; None: leave it), and return it.
    Only a GPT's (model.gpt.GPT) are: another model (the LSTM) is left as it is."""
    from model.gpt import GPT

    if check(how) is None or not isinstance(model, GPT):
        return model
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (HEAD or child is not model.lm_head):
                tied = child is model.lm_head and child.weight is model.tok_emb.weight
                setattr(module, child_name, Int8Linear(child, dense=tied))
    # the float weights kept (embeddings, norms, biases) copied out of the checkpoint file's mapping
    # (model/checkpoint.py's load_checkpoint): the mapping, and the pages the float matrices read here, then go
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype != torch.int8:
            t.data = t.data.clone()
    return model


def parameter_count(model):
    """The model's parameters, its int8 weights among them (an untied lm_head copy not: its matrix is tok_emb's)."""
    count = sum(p.numel() for p in model.parameters())
    head = getattr(model, "lm_head", None)
    return count + sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear) and m is not head)


def quantized(model):
    """What quantize did to `model`: "int8", or None."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None
