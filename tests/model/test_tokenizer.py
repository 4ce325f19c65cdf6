"""Tokenizers: characters of the training text, or UTF-8 bytes; both round-trip through a checkpoint."""

import pytest

from model import ByteTokenizer, CharTokenizer
from model.tokenizer import tokenizer_from_dict

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
        tokenizer_from_dict({"kind": "bpe"})
