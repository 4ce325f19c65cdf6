"""The vocabulary that constrains sampling to a grammar (model/grammar.py): which rows it masks and copies, and which
masks it computes (each once); tests/app/test_constrained.py specifies the outputs through the API."""

import threading
import time

import llguidance
import numpy as np
import torch

from model.grammar import Vocabulary, vocabulary
from model.sampling import Sampler, SamplingParams, sample
from model.tokenizer import ByteTokenizer, CharTokenizer


def constrained(vocab, regex, **params):
    grammar = llguidance.LLMatcher.grammar_from_regex(regex)
    return Sampler(SamplingParams(grammar=grammar, **params), [0], vocabulary=vocab)


def counting_masks(vocab):
    """Record each batch of samplers whose masks `vocab` computes (in its thread or at once)."""
    computed = []
    vocab.masks = lambda samplers: computed.append(len(samplers)) or Vocabulary.masks(vocab, samplers)
    return computed


def test_constrain_returns_only_the_constrained_rows_masked_and_leaves_the_logits_as_they_were():
    vocab = Vocabulary(ByteTokenizer())
    logits = torch.randn(3, 256)
    before = logits.clone()
    rows = [constrained(vocab, "[ab]"), constrained(vocab, "c")]
    masked = vocab.constrain(logits, rows, [0, 2])
    assert masked.shape == (2, 256)  # row 1, free, is not copied
    assert torch.equal(logits, before)
    assert masked[0].isfinite().nonzero()[:, 0].tolist() == [ord("a"), ord("b")]
    assert masked[1].isfinite().nonzero()[:, 0].tolist() == [ord("c")]
    assert torch.equal(masked[0, [97, 98]], logits[0, [97, 98]])


def test_constrain_over_every_row_masks_a_copy():
    vocab = Vocabulary(ByteTokenizer())
    logits = torch.randn(2, 256)
    before = logits.clone()
    masked = vocab.constrain(logits, [constrained(vocab, "a"), constrained(vocab, "b")], [0, 1])
    assert torch.equal(logits, before)
    assert masked.isfinite().sum(-1).tolist() == [1, 1]


def test_a_batch_of_free_and_constrained_rows_picks_as_each_row_alone():
    vocab = Vocabulary(ByteTokenizer())
    logits = torch.randn(4, 256)
    make = [
        lambda: constrained(vocab, "[a-z]", seed=1),
        lambda: Sampler(SamplingParams(seed=2), [0]),
        lambda: constrained(vocab, "[0-9]", temperature=0),
        lambda: Sampler(SamplingParams(temperature=0), [0]),
    ]
    together = sample([m() for m in make], logits)
    assert together == [sample([m()], logits[i : i + 1])[0] for i, m in enumerate(make)]
    assert chr(together[0]).islower() and chr(together[2]).isdigit()
    assert together[3] == int(logits[3].argmax())


def test_a_mask_computed_to_tell_a_whole_match_is_not_computed_again():
    tokenizer = CharTokenizer("enosy")
    vocab = Vocabulary(tokenizer)
    sampler = constrained(vocab, "yes(no)?", temperature=0)
    for _ in "yes":  # each one the grammar's only choice
        sample([sampler], torch.zeros(1, 5))
    assert isinstance(sampler.prefetched[0], np.ndarray)  # "yes" matches whole: ended() computed what may follow
    computed = counting_masks(vocab)
    masked = vocab.constrain(torch.zeros(1, 5), [sampler], [0])
    assert computed == []
    assert masked[0].isfinite().nonzero()[:, 0].tolist() == [tokenizer.stoi["n"]]


def test_a_whole_match_whose_continuations_the_vocabulary_lacks_is_complete():
    tokenizer = CharTokenizer("esy")  # no "#"
    sampler = constrained(Vocabulary(tokenizer), "yes(#)?", temperature=0)
    tokens = [sample([sampler], torch.zeros(1, 3))[0] for _ in range(3)]
    assert tokenizer.decode(tokens) == "yes" and sampler.complete and not sampler.failed


def test_no_mask_is_prefetched_for_a_row_that_made_its_max_new_tokens():
    vocab = Vocabulary(ByteTokenizer())
    sampler = constrained(vocab, "[a-z]+", max_new_tokens=2, seed=3)
    sample([sampler], torch.zeros(1, 256))
    assert sampler.prefetched is not None  # it goes on: its next mask is under way
    computed = counting_masks(vocab)
    sample([sampler], torch.zeros(1, 256))
    assert sampler.prefetched is None and computed == []


def test_one_vocabulary_a_tokenizer_whose_tables_are_made_once_when_threads_ask_together(monkeypatch):
    tokenizer = ByteTokenizer()
    assert vocabulary(tokenizer) is vocabulary(tokenizer) and vocabulary(ByteTokenizer()) is not vocabulary(tokenizer)
    made, real = [], llguidance.LLTokenizer

    def slow(wrapper):
        made.append(wrapper)
        time.sleep(0.05)  # wide enough for every thread to ask meanwhile
        return real(wrapper)

    monkeypatch.setattr(llguidance, "LLTokenizer", slow)
    vocab = Vocabulary(tokenizer)
    got = []
    threads = [threading.Thread(target=lambda: got.append(vocab.ll)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(ll) for ll in got}) == 1
