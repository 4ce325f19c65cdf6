"""TextStream: token ids to text that is safe to send (whole characters, never a stop string)."""

import pytest

from app.textstream import TextStream
from model import BPETokenizer, ByteTokenizer, CharTokenizer

BYTES = ByteTokenizer()


def feed(stream, text):
    """Push `text` one token at a time; return what each push released."""
    return [stream.push(t) for t in stream.tokenizer.encode(text)]


@pytest.mark.parametrize("text", ["héllo", "日本語", "emoji 🎉!", "Ω≈ç√∫"])
def test_byte_stream_sends_only_whole_characters(text):
    stream = TextStream(BYTES)
    out = feed(stream, text)
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_byte_stream_holds_the_first_bytes_of_a_character_until_its_last():
    stream = TextStream(BYTES)
    first, second, third, fourth = "🎉".encode()
    assert [stream.push(first), stream.push(second), stream.push(third)] == ["", "", ""]
    assert stream.push(fourth) == "🎉"


def test_byte_stream_turns_invalid_bytes_into_the_replacement_character():
    stream = TextStream(BYTES)
    assert stream.push(0xFF) == "\ufffd"
    assert stream.push(ord("a")) == "a"


def test_byte_stream_character_broken_off_by_a_byte_that_cannot_continue_it_becomes_a_replacement():
    stream = TextStream(BYTES)
    assert stream.push("é".encode()[0]) == ""  # held: it might still become "é"
    assert stream.push(ord("a")) == "\ufffda"
    assert stream.text == "\ufffda"


def test_byte_stream_cut_mid_character_flushes_a_replacement_not_raw_bytes():
    stream = TextStream(BYTES)
    assert stream.push("é".encode()[0]) == ""
    assert stream.flush() == "\ufffd"


def test_stop_string_is_never_sent_and_ends_the_stream():
    stream = TextStream(BYTES, stop=["END"])
    out = feed(stream, "Hello END world")
    assert "".join(out) == "Hello "
    assert stream.stopped
    assert stream.text == "Hello "
    assert stream.push(ord("x")) == "" and stream.flush() == ""


def test_possible_start_of_a_stop_string_is_held_then_released_when_it_is_not_one():
    stream = TextStream(BYTES, stop=["END"])
    assert feed(stream, "aEN") == ["a", "", ""]
    assert stream.push(ord("d")) == "ENd"
    assert not stream.stopped


def test_held_text_is_released_by_flush_at_the_end():
    stream = TextStream(BYTES, stop=["END"])
    assert "".join(feed(stream, "abcEN")) == "abc"
    assert stream.flush() == "EN"
    assert stream.text == "abcEN"


def test_earliest_stop_string_wins():
    stream = TextStream(BYTES, stop=["lo", "ell"])
    assert "".join(feed(stream, "Hello")) == "H"
    assert stream.stopped


def test_stop_string_with_multibyte_characters_matches_whole_characters():
    stream = TextStream(BYTES, stop=["né"])
    assert "".join(feed(stream, "bonne année")) == "bonne an"
    assert stream.stopped


def test_stop_string_overlapping_its_own_prefix_is_found():
    stream = TextStream(BYTES, stop=["aab"])
    assert "".join(feed(stream, "xaaab")) == "xa"
    assert stream.stopped


def test_char_tokenizer_stream_sends_each_character_at_once():
    chars = CharTokenizer.from_text("abc\n")
    stream = TextStream(chars, stop=["\n\n"])
    assert feed(stream, "ab\nc\n\na") == ["a", "b", "", "\nc", "", "", ""]
    assert stream.stopped and stream.text == "ab\nc"


def test_empty_stop_strings_are_ignored():
    stream = TextStream(BYTES, stop=[""])
    assert feed(stream, "ab") == ["a", "b"]


def test_bpe_stream_holds_a_character_cut_between_tokens_and_matches_stops_across_them():
    bpe = BPETokenizer.train(["héllo world, héllo there\n" * 20], vocab_size=280)
    e_first, e_second = ("é".encode()[0:1], "é".encode()[1:2])
    ids = [bpe.token_bytes.index(b"h"), bpe.token_bytes.index(e_first), bpe.token_bytes.index(e_second)]
    ids += bpe.encode("llo world")
    stream = TextStream(bpe, stop=["o wor"])
    out = [stream.push(i) for i in ids]
    assert out[:3] == ["h", "", "é"]  # the first byte of é is held until its second arrives
    assert "".join(out) + stream.flush() == "héll"
    assert stream.stopped
