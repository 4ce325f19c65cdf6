"""Tokenizers: characters of the training text, UTF-8 bytes, or a byte-level BPE; each round-trips through
its dict form (what a checkpoint stores)."""

import random

import pytest

from model import BPETokenizer, ByteTokenizer, CharTokenizer
from model.tokenizer import tokenizer_from_dict
from train.data import make_tokenizer, split_text

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_char_tokenizer_vocabulary_is_the_sorted_characters_of_the_text():
    tok = CharTokenizer.from_text("banana")
    assert tok.chars == ["a", "b", "n"]
    assert tok.vocab_size == 3
    assert tok.encode("nab") == [2, 0, 1]


def test_char_tokenizer_round_trips_the_training_text():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT


def test_char_tokenizer_round_trips_non_ascii_characters_it_has_seen():
    text = "héllo wörld ✓ 日本"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_when_text_has_unknown_characters_names_each_of_them():
    tok = CharTokenizer.from_text(TEXT)
    with pytest.raises(ValueError, match="vocabulary") as err:
        tok.encode("Zoë, hear me!")
    message = str(err.value)
    assert "'Z'" in message and "'ë'" in message and "'!'" in message
    assert "'h'" not in message  # known characters are not blamed


def test_byte_tokenizer_has_256_tokens_and_encodes_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("é") == [0xC3, 0xA9]


@pytest.mark.parametrize("text", ["", "plain ascii", "héllo wörld", "✓ 日本語 🙂", "\x00\n\t"])
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_decode_of_a_cut_character_does_not_raise():
    # A sampled byte sequence can end mid-character; decoding must still give text.
    assert ByteTokenizer().decode([0xE6, 0x97]) == "\ufffd"


@pytest.mark.parametrize("tok", [CharTokenizer.from_text(TEXT), ByteTokenizer()])
def test_tokenizer_survives_its_dict_form(tok):
    again = tokenizer_from_dict(tok.to_dict())
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_tokenizer_from_dict_with_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})


# byte-level BPE (Hugging Face tokenizers), learned from the corpus

BPE_CORPUS = TEXT * 30 + "Citizens, citizens! What say you to the people of Rome?\n" * 30


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([BPE_CORPUS], vocab_size=300)


def test_bpe_learns_merges_up_to_the_vocabulary_size_on_top_of_the_256_bytes(bpe):
    assert bpe.vocab_size == 300
    assert {bytes([b]) for b in range(256)} <= set(bpe.token_bytes)
    assert len(bpe.encode(TEXT)) < 0.6 * len(TEXT.encode())  # merges make the text shorter than its bytes


@pytest.mark.parametrize(
    "text",
    ["", TEXT, "héllo wörld ✓ 日本語 🙂", "\x00\x01\r\n\t  trailing  ", "Zoë — never seen ⚡ in training", "🧑‍🚀" * 3],
)
def test_bpe_round_trips_any_unicode_text(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode("utf-8")


def test_bpe_token_bytes_may_end_inside_a_character(bpe):
    first, second = "é".encode()
    ids = [bpe.token_bytes.index(bytes([first])), bpe.token_bytes.index(bytes([second]))]
    assert bpe.decode_bytes(ids[:1]) == b"\xc3"  # half a character: the text stream holds it back
    assert bpe.decode(ids) == "é"


def test_bpe_is_learned_from_the_training_split_only():
    unseen = "zyxwvutsrq "
    text = TEXT * 99 + unseen * 61  # 6,039 + 671 bytes: the unseen word is exactly the last 10%
    assert split_text(text) == (TEXT * 99, unseen * 61)
    bpe = make_tokenizer("bpe", text, vocab_size=400)
    assert not any(b"zy" in t or b"xw" in t for t in bpe.token_bytes)  # never merged: never seen
    assert any(b"Citizen" in t for t in bpe.token_bytes)


def test_bpe_with_fewer_than_256_tokens_is_refused():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train([TEXT], vocab_size=200)


@pytest.mark.parametrize("bad", [{"kind": "bpe"}, {"kind": "bpe", "json": "{not json"}])
def test_bpe_from_a_damaged_dict_raises_a_value_error_saying_so(bad):
    with pytest.raises(ValueError, match="bpe tokenizer"):
        tokenizer_from_dict(bad)


def test_bpe_survives_its_dict_form(bpe):
    again = tokenizer_from_dict(bpe.to_dict())
    assert isinstance(again, BPETokenizer) and again.vocab_size == bpe.vocab_size
    assert again.encode(BPE_CORPUS) == bpe.encode(BPE_CORPUS)
    assert again.token_bytes == bpe.token_bytes


def test_bpe_encodes_a_long_text_in_pieces_with_the_ids_of_encoding_it_whole(bpe, monkeypatch):
    from model import tokenizer as tokenizer_module

    text = ("Citizens,  hear\tme!\n\n\nZoë \r\nsaid: «déjà vu» 🙂\n  \n" + TEXT) * 40
    whole = bpe.tokenizer.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 50)
    pieces = list(tokenizer_module.bpe_pieces(text, 50))
    assert len(pieces) > 40 and "".join(pieces) == text
    assert bpe.encode(text) == whole


def random_text(rng, n):
    """n code points from all over Unicode: ASCII, controls, combining marks, CJK, astral (emoji and beyond);
    no surrogates, which are not text."""
    ranges = [(0x0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.mark.parametrize("seed", range(20))
def test_bpe_round_trips_random_unicode(bpe, seed):
    rng = random.Random(seed)
    text = random_text(rng, rng.randint(1, 400))
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and bpe.decode_bytes(ids) == text.encode("utf-8")
