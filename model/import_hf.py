"""Import a Hugging Face GPT-2 checkpoint from a local directory as a Quill run directory.

    python -m model.import_hf path/to/gpt2 --out checkpoints/gpt2 [--overwrite]
    python -m app --checkpoint checkpoints/gpt2

The directory needs config.json, model.safetensors and tokenizer.json, as `save_pretrained` writes them
(GPT-2 small on the Hub has all three). Nothing is downloaded. GPT-2 is the course GPT with the tanh GELU:
the same pre-LN blocks, fused q/k/v with biases, learned positions and a head tied to the embedding, so the
weights map one to one; only GPT-2's Conv1D matrices are stored (in, out) and are transposed to nn.Linear's.
"""

import argparse
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model.checkpoint import WEIGHTS_NAME, CheckpointError, file_sha256, load_model_tensors, save_checkpoint
from model.gpt import GPT
from model.tokenizer import BPETokenizer

PROG = "python -m model.import_hf"
GELU_OF_ACTIVATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
# GPT-2 options whose non-default value changes the arithmetic the course GPT does: (key, default).
FIXED_OPTIONS = [
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("add_cross_attention", False),
    ("tie_word_embeddings", True),
    ("layer_norm_epsilon", 1e-5),  # every LayerNorm of the GPT uses torch's default
]
# Our module -> GPT-2's, per block; "conv" ones are Conv1D, whose weight is nn.Linear's transposed.
BLOCK_MODULES = {
    "ln1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.proj": ("attn.c_proj", True),
    "ln2": ("ln_2", False),
    "mlp.fc": ("mlp.c_fc", True),
    "mlp.proj": ("mlp.c_proj", True),
}


def refuse(message):
    raise SystemExit(f"{PROG}: {message}")


def read_config(hf_dir):
    """GPT's keyword arguments from config.json, or refuse naming what does not fit."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        refuse(f"{hf_dir / 'config.json'} is not valid JSON: {e}")
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if config.get("model_type") != "gpt2" or architectures != ["GPT2LMHeadModel"]:
        refuse(
            f"{hf_dir} holds model_type {config.get('model_type')!r} (architectures {architectures}); "
            "only GPT-2 (model_type 'gpt2', GPT2LMHeadModel) imports"
        )
    activation = config.get("activation_function", "gelu_new")
    if activation not in GELU_OF_ACTIVATION:
        refuse(f"activation_function {activation!r} is not supported (only {', '.join(GELU_OF_ACTIVATION)})")
    hidden = config.get("n_embd", 768)
    if config.get("n_inner") not in (None, 4 * hidden):
        refuse(f"n_inner {config['n_inner']} is not supported: the MLP is 4 * n_embd = {4 * hidden} wide")
    for key, default in FIXED_OPTIONS:
        if config.get(key, default) != default:
            refuse(f"{key} = {config[key]!r} is not supported (only {default!r})")
    return config, dict(
        vocab_size=config.get("vocab_size", 50257),
        context_size=config.get("n_positions", 1024),
        hidden_size=hidden,
        n_layer=config.get("n_layer", 12),
        n_head=config.get("n_head", 12),
        dropout=config.get("resid_pdrop", 0.1),  # training only; the server runs the model in eval mode
        gelu=GELU_OF_ACTIVATION[activation],
    )


def read_tokenizer(path):
    """A GPT-2 tokenizer.json as Quill's byte-level BPE. Added tokens such as <|endoftext|> keep their text as
    their bytes (as transformers decodes them with skip_special_tokens=False); encode adds none."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
        spec = json.loads(tokenizer.to_str())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE":
            refuse(f"{path} is a {model.get('type')} tokenizer; only GPT-2's byte-level BPE imports")
        # GPT-2's own splitting, which the safe cuts of long texts (model.tokenizer.safe_cut) rely on
        gpt2_split = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
        if not gpt2_split or spec.get("normalizer"):
            refuse(
                f"{path} splits text otherwise than GPT-2 (pre-tokenizer {pre.get('type')}, normalizer "
                f"{(spec.get('normalizer') or {}).get('type')}); only GPT-2's byte-level BPE imports"
            )
        return BPETokenizer(tokenizer)
    except KeyError:  # a token with a character outside the byte-level alphabet
        refuse(f"{path} is not a byte-level BPE: a token has a character outside GPT-2's byte alphabet")
    except Exception as e:  # the library's parse errors have no common type
        refuse(f"{path} does not load as a tokenizer: {e}")


def token_content(token):
    """tokenizer_config.json writes a special token as its text or as an AddedToken dict holding it."""
    return token.get("content") if isinstance(token, dict) else token


def read_chat(hf_dir):
    """The chat template (chat_template.jinja, or tokenizer_config.json's chat_template) and the bos and eos
    token texts it may use, for the checkpoint's metadata; {} when the directory has no template."""
    config_path = hf_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError as e:
        refuse(f"{config_path} is not valid JSON: {e}")
    if not isinstance(config, dict):
        refuse(f"{config_path} holds {type(config).__name__}, not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default"
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        refuse(f"{config_path}: chat_template is {type(template).__name__}, not a Jinja template string")
    if (hf_dir / "chat_template.jinja").is_file():  # where newer transformers saves it
        template = (hf_dir / "chat_template.jinja").read_text()
    if not template:
        return {}
    special = {name: token_content(config.get(name)) for name in ("bos_token", "eos_token")}
    return {"chat_template": template, "special_tokens": {k: v for k, v in special.items() if isinstance(v, str)}}


def quill_tensors(hf, n_layer):
    """Our state dict (without the tied lm_head) from GPT-2's tensors, named with or without "transformer."."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}

    def take(name):
        if name not in hf:
            refuse(f"model.safetensors lacks {name!r}: not a GPT-2 checkpoint of this config")
        return hf.pop(name)

    out = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    for i in range(n_layer):
        for ours, (theirs, conv) in BLOCK_MODULES.items():
            weight = take(f"h.{i}.{theirs}.weight")
            out[f"blocks.{i}.{ours}.weight"] = weight.T.contiguous() if conv else weight
            out[f"blocks.{i}.{ours}.bias"] = take(f"h.{i}.{theirs}.bias")
        for buffer in ("attn.bias", "attn.masked_bias"):  # older files keep the causal mask; we build our own
            hf.pop(f"h.{i}.{buffer}", None)
    out["ln_f.weight"], out["ln_f.bias"] = take("ln_f.weight"), take("ln_f.bias")
    lm_head = hf.pop("lm_head.weight", None)
    if lm_head is not None and not lm_head.equal(out["tok_emb.weight"]):
        refuse("lm_head.weight differs from the token embedding; only GPT-2's tied head is supported")
    if hf:
        refuse(f"model.safetensors has tensors GPT-2 of this config does not: {sorted(hf)[:5]}")
    return out


def import_gpt2(hf_dir, out_dir):
    """Read the GPT-2 in `hf_dir`, write `out_dir`/model.safetensors; return (model, tokenizer). Refusals come
    before anything is written."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        refuse(f"{hf_dir} is not a directory")
    weights = hf_dir / "model.safetensors"
    if not weights.is_file() and any(hf_dir.glob("pytorch_model*.bin")):
        refuse(f"{hf_dir} has only pytorch_model.bin (a pickle); weights are only read from model.safetensors")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (hf_dir / name).is_file():
            refuse(f"{hf_dir} lacks {name} (needs config.json, model.safetensors and tokenizer.json)")
    config, gpt_args = read_config(hf_dir)
    tokenizer = read_tokenizer(hf_dir / "tokenizer.json")
    if tokenizer.vocab_size != gpt_args["vocab_size"]:
        refuse(
            f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is {gpt_args['vocab_size']}"
        )
    try:
        hf = load_file(weights)
    except (SafetensorError, OSError) as e:
        refuse(f"{weights} is not a readable safetensors file: {e}")
    model = GPT(**gpt_args)
    try:
        load_model_tensors(model, {k: v.float() for k, v in quill_tensors(hf, gpt_args["n_layer"]).items()}, weights)
    except CheckpointError as e:
        refuse(str(e))
    meta = {
        "imported_from": {
            "path": str(hf_dir.resolve()),
            "sha256": file_sha256(weights),
            "name_or_path": config.get("_name_or_path") or None,
        },
        **read_chat(hf_dir),
    }
    save_checkpoint(out_dir / WEIGHTS_NAME, model, tokenizer, meta)
    return model.eval(), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", type=Path, help="a local GPT-2 directory (config.json, model.safetensors, ...)")
    parser.add_argument("--out", required=True, type=Path, help="the run directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out's model.safetensors if it exists")
    args = parser.parse_args(argv)
    if (args.out / WEIGHTS_NAME).exists() and not args.overwrite:
        refuse(f"{args.out / WEIGHTS_NAME} exists; pass --overwrite to replace it")
    try:
        model, tokenizer = import_gpt2(args.hf_dir, args.out)
    except OSError as e:
        refuse(f"cannot read {args.hf_dir} or write {args.out}: {e.strerror or e}")
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out / WEIGHTS_NAME}: GPT-2, {params:,} parameters, {tokenizer.vocab_size} tokens, "
        f"context {model.config.context_size}; serve it: python -m app --checkpoint {args.out}"
    )


if __name__ == "__main__":
    main()
