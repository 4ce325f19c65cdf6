"""Export a checkpoint for other runtimes, one function per format.

    python -m model.export checkpoints/shakespeare-gpt --format gguf [--dtype f16]  # exports/shakespeare-gpt-f16.gguf
    python -m model.export checkpoints/shakespeare-gpt --format hf                  # exports/shakespeare-gpt-hf/

GGUF is llama.cpp's file (Ollama runs it too): architecture "gpt2", written the way llama.cpp's
convert_hf_to_gguf.py writes GPT-2, so llama-server and llama-cli run it with no Quill code. llama.cpp's
gpt2 uses the tanh GELU: a model with gelu "tanh" (an imported GPT-2) computes there exactly what it does
here; the course's exact-GELU models differ by about 1e-3 in the logits.

"hf" is a Hugging Face directory (config.json, model.safetensors, tokenizer.json) that transformers loads
as GPT2LMHeadModel and PreTrainedTokenizerFast, with no Quill code.
"""

import argparse
import contextlib
import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from model.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    atomic_path,
    atomic_write_bytes,
    load_checkpoint,
    model_name,
    resolve_checkpoint_path,
)
from model.gpt import GPT
from model.import_hf import BLOCK_MODULES
from model.tokenizer import BPETokenizer, ByteTokenizer, byte_level_chars

EXPORTS = Path("exports")  # where exports go unless --out says otherwise; git-ignored
T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
# --dtype: how 2-D weights are stored, and the file type llama.cpp reports.
GGUF_DTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# A Block's module -> llama.cpp's gpt2 tensor. Our qkv Linear stacks q, k, v along its output rows,
# as GPT-2's c_attn does, and nn.Linear's (out, in) weight is already the layout convert_hf_to_gguf.py
# gets by transposing GPT-2's Conv1D, so every weight goes in as it is.
BLOCK_TENSORS = {
    "ln1": T.ATTN_NORM,
    "attn.qkv": T.ATTN_QKV,
    "attn.proj": T.ATTN_OUT,
    "ln2": T.FFN_NORM,
    "mlp.fc": T.FFN_UP,
    "mlp.proj": T.FFN_DOWN,
}


def gguf_tensors(model):
    """(GGUF name, tensor) for every weight of a GPT, in llama.cpp's gpt2 naming."""

    def name(tensor, bid=None):
        return gguf.TENSOR_NAMES[tensor].format(bid=bid)

    yield name(T.TOKEN_EMBD) + ".weight", model.tok_emb.weight
    yield name(T.POS_EMBD) + ".weight", model.pos_emb.weight
    for i, block in enumerate(model.blocks):
        for module_name, tensor in BLOCK_TENSORS.items():
            module = block.get_submodule(module_name)
            yield name(tensor, i) + ".weight", module.weight
            yield name(tensor, i) + ".bias", module.bias
    yield name(T.OUTPUT_NORM) + ".weight", model.ln_f.weight
    yield name(T.OUTPUT_NORM) + ".bias", model.ln_f.bias
    # The lm head is tied to the embedding; older llama.cpp requires output.weight, so it is written twice.
    yield name(T.OUTPUT) + ".weight", model.lm_head.weight


def stored(name, data, qtype):
    """(array, type) as convert_hf_to_gguf.py stores a tensor: norms, biases and position embeddings stay f32."""
    if data.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[T.POS_EMBD]):
        qtype = Q.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:  # q8_0 needs rows that are a multiple of 32 wide; convert falls back to f16 too
        return data.astype(np.float16), Q.F16


def rwkv_token(piece):
    """One vocabulary entry (bytes) as llama.cpp's rwkv tokenizer reads it: printable text as it is, a backslash
    doubled, anything else (newline, control and lone bytes) as \\xNN with lowercase hex, which is all it parses."""
    with contextlib.suppress(UnicodeDecodeError):
        text = piece.decode("utf-8")
        if text.isprintable():
            return text.replace("\\", "\\\\")
    return "".join(f"\\x{b:02x}" for b in piece)


def gguf_vocab(tokenizer):
    """The token list: entry i is the text of Quill's token i.

    Why llama.cpp's "rwkv" tokenizer and not "llama" (SentencePiece): llama.cpp's SPM vocab assumes
    bos/eos/unk at ids 1/2/0 and no key can unset them, so in a character vocabulary the character at
    id 2 ('!' in Shakespeare) would be end-of-generation. The rwkv vocab has no special tokens, adds no
    BOS and no space prefix, does not rewrite spaces, and tokenizes by longest byte match over exactly
    these entries: one token per character (or byte), as Quill does, newline and control characters
    included. (Read in ggml-org/llama.cpp src/llama-vocab.cpp.) A prompt character outside the
    vocabulary becomes token -1, an invalid one; llama.cpp loops forever on one that shares its first
    UTF-8 byte with a vocabulary character, so prompts must keep to the vocabulary's characters.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return [rwkv_token(bytes([i])) for i in range(256)]
    return [rwkv_token(c.encode("utf-8")) for c in tokenizer.chars]


def bpe_merges(tokenizer):
    """A BPE tokenizer's merges in rank order as GGUF keeps them, "a b": `tokenizers` stores each one so or,
    in newer versions, as a pair. No byte-level token holds a space (space is "Ġ"), so the split is unambiguous."""
    merges = json.loads(tokenizer.to_dict()["json"])["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# The end token a byte-level BPE's GGUF vocabulary gets after the model's own; the space keeps it from ever
# equalling a byte-level token's text.
END_TOKEN = "[quill end of text]"


def add_tokenizer(writer, tokenizer):
    """Write the vocabulary; return how many tokens it has beyond the model's (0, or 1 for a BPE).

    A byte-level BPE is written as convert_hf_to_gguf.py writes GPT-2's: tokenizer "gpt2", pre-tokenizer
    "gpt-2" (the same regex as `tokenizers`' ByteLevel), the token strings in byte-level form and the merges.
    But llama.cpp's gpt2 vocab takes bos and eos to be id 11 unless the file names others in range (an id out
    of range falls back to 11), and eos always ends generation: Quill's BPE has no special token, so id 11 is
    an ordinary one (',', as in GPT-2). So, like GPT-2's <|endoftext|>, one token more is written, bos and
    eos, of type UNUSED so that llama.cpp never matches it in prompt text; `end_token_rows` gives it its weights,
    and tokenizer.ggml.suppress_tokens has llama.cpp's samplers give it no chance. The GPT-2 regex also keeps
    letters and punctuation in separate words, so no BPE token can be a name such as "</s>" that llama.cpp
    takes for an end of generation by its text. (Read in ggml-org/llama.cpp src/llama-vocab.cpp.)
    """
    if not isinstance(tokenizer, BPETokenizer):
        writer.add_tokenizer_model("rwkv")
        writer.add_token_list(gguf_vocab(tokenizer))
        writer.add_token_types([gguf.TokenType.NORMAL] * tokenizer.vocab_size)
        return 0
    n = tokenizer.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([tokenizer.tokenizer.id_to_token(i) for i in range(n)] + [END_TOKEN])
    writer.add_token_types([gguf.TokenType.NORMAL] * n + [gguf.TokenType.UNUSED])
    writer.add_token_merges(bpe_merges(tokenizer))
    writer.add_bos_token_id(n)
    writer.add_eos_token_id(n)
    writer.add_array("tokenizer.ggml.suppress_tokens", [n])  # gguf 0.19 has no add_suppress_tokens yet
    return 1


def end_token_rows(name, data):
    """`data` with the end token's row where a tensor has one row per token: zero in the embedding (it is
    never an input) and, in the output, the mean of the others, so its logit is the mean of the model's
    logits: never the greedy choice, even in a runtime that ignores suppress_tokens."""
    if name == gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight":
        return np.vstack([data, np.zeros_like(data[:1])])
    if name == gguf.TENSOR_NAMES[T.OUTPUT] + ".weight":
        return np.vstack([data, data.mean(axis=0, keepdims=True)])
    return data


def export_gguf(model, tokenizer, out, dtype="f32", name="quill"):
    """Write `model` (a GPT) and its tokenizer to the GGUF file `out`, atomically."""
    qtype, file_type = GGUF_DTYPES[dtype]
    cfg = model.config
    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_name(name)
    writer.add_context_length(cfg.context_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(model.ln_f.eps)  # every LayerNorm of the GPT uses torch's default, 1e-5
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra_tokens = add_tokenizer(writer, tokenizer)
    writer.add_add_bos_token(False)  # Quill's prompts start with no special token
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for tensor_name, tensor in gguf_tensors(model):
        data = tensor.detach().float().cpu().numpy()
        if extra_tokens:
            data = end_token_rows(tensor_name, data)
        data, data_type = stored(tensor_name, data, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=data_type)

    with atomic_path(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


HF_ACTIVATION = {"exact": "gelu", "tanh": "gelu_new"}  # transformers' names for the two GELU forms
HF_END_TOKEN = "<|endoftext|>"  # GPT-2's, kept as bos/eos when a BPE (e.g. an imported GPT-2) has it


def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` whose ids are Quill's. A character or byte vocabulary becomes a BPE with no
    merges, so each character (byte) is one token: characters over the raw text, joined back by Fuse; bytes
    through ByteLevel with no regex split, so any text encodes to its UTF-8 bytes. No BPE has an unknown token:
    a character outside a character vocabulary is dropped (Quill refuses it)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        chars = byte_level_chars()
        hf = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return hf
    hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
    hf.decoder = decoders.Fuse()
    return hf


def hf_tensors(model):
    """GPT2LMHeadModel's state dict from a GPT: Conv1D weights are nn.Linear's transposed; the tied lm_head is
    left out, as save_pretrained does, and transformers ties it to the embedding on load."""
    out = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight}
    for i, block in enumerate(model.blocks):
        for ours, (theirs, conv) in BLOCK_MODULES.items():
            module = block.get_submodule(ours)
            out[f"transformer.h.{i}.{theirs}.weight"] = module.weight.T if conv else module.weight
            out[f"transformer.h.{i}.{theirs}.bias"] = module.bias
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = model.ln_f.weight, model.ln_f.bias
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def export_hf(model, tokenizer, out):
    """Write `model` (a GPT) and its tokenizer to the directory `out` as a transformers GPT-2, file by file."""
    cfg, out = model.config, Path(out)
    hf = hf_tokenizer(tokenizer)
    end = hf.token_to_id(HF_END_TOKEN) if isinstance(tokenizer, BPETokenizer) else None
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": HF_ACTIVATION[cfg.gelu],
        **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), cfg.dropout),
        "layer_norm_epsilon": model.ln_f.eps,
        "tie_word_embeddings": True,
        "bos_token_id": end,
        "eos_token_id": end,
        "dtype": "float32",
    }
    # Quill's text is exactly the tokens' text: no spaces "cleaned up" around punctuation on decode.
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.context_size,
        "clean_up_tokenization_spaces": False,
    }
    if end is not None:
        tok_config.update(bos_token=HF_END_TOKEN, eos_token=HF_END_TOKEN)
    weights = safetensors_bytes(hf_tensors(model), metadata={"format": "pt"})  # transformers asks for "format"
    atomic_write_bytes(out / WEIGHTS_NAME, weights)
    atomic_write_bytes(out / "tokenizer.json", hf.to_str().encode("utf-8"))
    for name, data in (("config.json", config), ("tokenizer_config.json", tok_config)):
        atomic_write_bytes(out / name, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a run directory or a .safetensors file")
    parser.add_argument("--format", required=True, choices=["gguf", "hf"])
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the file (gguf) or directory (hf) to write (default: {EXPORTS}/NAME-DTYPE.gguf or {EXPORTS}/NAME-hf, "
        "NAME the checkpoint's)",
    )
    parser.add_argument("--dtype", choices=list(GGUF_DTYPES), help="gguf only: how 2-D weights are stored (f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    if args.format == "hf" and args.dtype:
        raise SystemExit("python -m model.export: --dtype is for --format gguf; hf weights are written as f32")
    args.dtype = args.dtype or "f32"
    name = model_name(resolve_checkpoint_path(args.checkpoint))
    args.out = args.out or EXPORTS / (f"{name}-hf" if args.format == "hf" else f"{name}-{args.dtype}.gguf")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"python -m model.export: {args.out} exists; pass --overwrite to replace it")
    source = resolve_checkpoint_path(args.checkpoint).resolve()
    if args.out.resolve() in (source, source.parent):  # --overwrite must not turn the checkpoint into its export
        raise SystemExit(f"python -m model.export: --out {args.out} is the checkpoint itself; choose another --out")
    try:
        model, tokenizer, _ = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"python -m model.export: cannot load the checkpoint: {e}") from None
    if not isinstance(model, GPT):
        runtime = "llama.cpp" if args.format == "gguf" else "transformers' GPT-2"
        raise SystemExit(
            f"python -m model.export: {args.checkpoint} is an LSTM; only GPT checkpoints export ({runtime} has no LSTM)"
        )
    try:
        if args.format == "hf":
            export_hf(model, tokenizer, args.out)
        else:
            export_gguf(model, tokenizer, args.out, args.dtype, name=name)
    except OSError as e:
        raise SystemExit(f"python -m model.export: cannot write {args.out}: {e.strerror or e}") from None
    if args.format == "hf":
        print(f"wrote {args.out}: transformers.GPT2LMHeadModel.from_pretrained({str(args.out)!r})")
        return
    size_mb = args.out.stat().st_size / 1e6
    print(
        f"wrote {args.out} ({args.dtype}, {size_mb:.1f} MB); context {model.config.context_size}: "
        f"llama-server -m {args.out} -c {model.config.context_size}"
    )


if __name__ == "__main__":
    main()
