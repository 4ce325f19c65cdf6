"""Tokenizers: characters of the training text (the course's choice), raw UTF-8 bytes, or a byte-level
BPE learned from the corpus. Each one encodes text to ids, gives the bytes of ids, and saves itself as
a dict that goes into the checkpoint."""

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PIECE_CHARS = 256 << 10  # a long text is encoded (and learned from) in pieces about this long; see bpe_pieces


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {', '.join(map(repr, unknown))}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def to_dict(self):
        return {"kind": self.kind, "chars": "".join(self.chars)}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return bytes(ids)

    def to_dict(self):
        return {"kind": self.kind}


def byte_level_chars():
    """The printable stand-in for each byte in a byte-level BPE's token strings (GPT-2's convention, which
    `tokenizers`' ByteLevel follows): printable Latin-1 bytes stand for themselves, the other bytes for
    the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def safe_cut(text):
    """The last index in `text` where cutting it leaves the ids of a byte-level BPE unchanged, or None.

    Cut right before a "\\n" (or the "\\r" of "\\r\\n") that follows a non-whitespace character. GPT-2's
    pre-tokenizer regex, which the byte-level BPE uses, has no piece that holds a non-whitespace character
    followed by whitespace, and it looks neither behind nor past such a pair, so the text on either side splits
    into the same pieces whether it is tokenized alone or whole: chunk by chunk gives exactly the ids of the
    whole text. Elsewhere, e.g. inside a run of blank lines or spaces ("\\n\\n" is one piece, and "  x" splits
    as " " + " x"), a cut would change the pieces and so the ids. Python's isspace() accepts every character
    the regex's \\s does, so a character it calls non-whitespace is one for the regex too."""
    i = text.rfind("\n")
    while i > 0:
        j = i - 1 if text[i - 1] == "\r" else i
        if j > 0 and not text[j - 1].isspace():
            return j
        i = text.rfind("\n", 0, i)
    return None


def bpe_pieces(text, size=None):
    """`text` in pieces of about `size` characters, cut only where safe_cut allows (or, with no such place in
    a piece, anywhere): `tokenizers` holds about 150 bytes per byte of the text it encodes, so a long text
    goes through it a piece at a time, with the same ids."""
    start, size = 0, size or PIECE_CHARS
    while len(text) - start > size:
        cut = safe_cut(text[start : start + size])
        end = start + (cut or size)
        yield text[start:end]
        start = end
    if start < len(text) or not text:
        yield text[start:]


class BPETokenizer:
    """Byte-level BPE (Hugging Face `tokenizers`), trained on the user's corpus: any text encodes, and a
    token's bytes may end inside a character, which the server's text stream holds back until whole."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        byte_of = {c: b for b, c in byte_level_chars().items()}
        self.token_bytes = [bytes(byte_of[c] for c in tokenizer.id_to_token(i)) for i in range(self.vocab_size)]

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn merges from `texts` (an iterable of strings: the training split only) up to `vocab_size`
        tokens; every one of the 256 bytes is a token, so nothing is ever unknown."""
        if vocab_size < 256:
            raise ValueError(f"a byte-level BPE needs a vocabulary of at least 256 tokens, not {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tokenizer.train_from_iterator((piece for text in texts for piece in bpe_pieces(text)), trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text):
        return cls(Tokenizer.from_str(text))

    def with_dropout(self, p):
        """This tokenizer with BPE-dropout (Provilkov et al., 2020): each merge is skipped with probability
        `p`, so each encoding of a text segments it a little differently (the same bytes, more tokens).
        For training only: it is never saved, and serving encodes with the plain tokenizer."""
        spec = json.loads(self.tokenizer.to_str())
        spec["model"]["dropout"] = p
        return BPETokenizer(Tokenizer.from_str(json.dumps(spec)))

    def encode(self, text):
        if len(text) <= PIECE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return [i for piece in bpe_pieces(text) for i in self.tokenizer.encode(piece, add_special_tokens=False).ids]

    def encode_batch(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes[i] for i in ids)

    def to_dict(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "json": self.tokenizer.to_str()}


def tokenizer_from_dict(d):
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "byte":
        return ByteTokenizer()
    if d.get("kind") == "bpe":
        if not isinstance(d.get("json"), str):
            raise ValueError("a bpe tokenizer needs its tokenizers JSON under 'json'")
        try:
            return BPETokenizer.from_json(d["json"])
        except Exception as e:  # the library's parse errors have no common type
            raise ValueError(f"the bpe tokenizer's JSON does not load: {e}") from None
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r}")
