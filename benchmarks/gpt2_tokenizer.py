"""GPT-2's own tokenizer, offline: rebuilt from the BPE ranks the openai-whisper sdist on PyPI carries.

`whisper/assets/gpt2.tiktoken` lists GPT-2's 50,256 byte-level tokens, one a line: the token's bytes in
base64, then its rank, which is its id in GPT-2's vocabulary. The first 256 are the single bytes; every later
token is one merge of two earlier ones, and the merge that made it is found by running BPE on its bytes with
the lower ranks only: what is left is the pair. Written as a `tokenizers` byte-level BPE (GPT-2's alphabet,
pre-tokenizer and decoder, <|endoftext|> as id 50256), it encodes as GPT-2's tokenizer.json does.

    python -m benchmarks.gpt2_tokenizer OUT_DIR   # fetch (or reuse) the ranks, save a GPT2TokenizerFast there
"""

import base64
import functools
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from model.tokenizer import byte_level_chars

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".tools" / "gpt2-tokenizer"
SDIST = "openai-whisper==20250625"  # pinned: its gpt2.tiktoken is GPT-2's, whatever later releases carry
RANKS_NAME = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # the file in that sdist
END_TOKEN = "<|endoftext|>"


def read_ranks(path):
    """{token bytes: rank} from a .tiktoken file."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_of(token, ranks):
    """The two tokens whose merge made `token`: BPE on its bytes with the ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts


def build_tokenizer(ranks, end_token=END_TOKEN):
    """A `tokenizers` byte-level BPE of `ranks` (ids = ranks), with `end_token` added after the last."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the ranks are not 0, 1, ..., n-1")
    if sorted(t for t in ranks if len(t) == 1) != [bytes([b]) for b in range(256)]:
        raise ValueError("the ranks lack some of the 256 single bytes")
    char = byte_level_chars()

    def text(token):
        return "".join(char[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    by_rank = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    merges = [tuple(text(p) for p in merge_of(t, ranks)) for _, t in by_rank]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(end_token, special=True)])
    return tokenizer


@functools.cache  # once a run: offline, pip's tries take a while
def fetch_ranks(cache=CACHE):
    """The path of GPT-2's gpt2.tiktoken under `cache`, taken from the openai-whisper sdist, which
    `pip download` fetches the first time; None (and a line saying why) when pip cannot get it."""
    ranks = cache / RANKS_NAME
    if ranks.is_file():
        return ranks
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("openai_whisper-*.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "--retries", "1"]
        cmd += ["-d", str(cache)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(cache.glob("openai_whisper-*.tar.gz"))
        if run.returncode or not sdists:
            why = (run.stderr.strip().splitlines() or ["no sdist"])[-1]
            print(f"GPT-2's tokenizer: pip could not download {SDIST} ({why})", flush=True)
            return None
    with tarfile.open(sdists[-1]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(f"whisper/assets/{RANKS_NAME}")), None)
        if member is None:
            print(f"GPT-2's tokenizer: {sdists[-1].name} holds no whisper/assets/{RANKS_NAME}", flush=True)
            return None
        data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        print(f"GPT-2's tokenizer: {sdists[-1].name}'s {RANKS_NAME} is not the one expected (its SHA-256 differs)")
        return None
    part = ranks.with_suffix(".part")
    part.write_bytes(data)
    part.rename(ranks)
    return ranks


def gpt2_tokenizer(cache=CACHE):
    """GPT-2's tokenizer (a `tokenizers.Tokenizer`), or None when its ranks cannot be had."""
    path = fetch_ranks(cache)
    return build_tokenizer(read_ranks(path)) if path else None


def save_hf(tokenizer, out, max_length=1024):
    """Save `tokenizer` to `out` as a GPT2TokenizerFast's save_pretrained writes it (tokenizer.json and
    tokenizer_config.json, <|endoftext|> its bos, eos and unk), with GPT-2's vocab.json and merges.txt beside
    them, which transformers 5 no longer writes but older readers of GPT-2 directories look for."""
    from transformers import GPT2TokenizerFast  # slow to import: only when saving

    end = END_TOKEN
    Path(out).mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab()  # the added <|endoftext|> too, as GPT-2's vocab.json has it
    (Path(out) / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (Path(out) / "merges.txt").write_text("\n".join(["#version: 0.2", *lines]) + "\n")
    fast = GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=end, eos_token=end, unk_token=end)
    fast.model_max_length = max_length
    fast.save_pretrained(out)


if __name__ == "__main__":
    tokenizer = gpt2_tokenizer()
    if tokenizer is None:
        raise SystemExit(1)
    save_hf(tokenizer, sys.argv[1])
    print(f"wrote GPT-2's tokenizer ({tokenizer.get_vocab_size()} tokens) to {sys.argv[1]}")
