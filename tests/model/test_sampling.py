"""The sampler: SamplingParams in, one token id out; and a request's Sampler, which keeps its state."""

import pytest
import torch

from model.sampling import Sampler, SamplingParams, penalize, sample_next_token, uniform
from model.sampling import sample as batched_sample


def mask(ids, size):
    """(size,) bool, True at each id in `ids`: the form in which the sampler takes the ids seen."""
    seen = torch.zeros(size, dtype=torch.bool)
    seen[torch.tensor(ids, dtype=torch.long)] = True
    return seen


def sample(logits, position=0, seen=None, **params):
    return sample_next_token(logits, SamplingParams(**params), position, seen)


def places(logits, n, **params):
    """The tokens drawn at places 0..n-1 of one request from the same logits."""
    return [sample(logits, place, **params) for place in range(n)]


def test_sample_next_token_at_temperature_zero_is_argmax_at_every_place():
    assert set(places(torch.tensor([0.1, 3.0, -1.0, 2.9]), 50, temperature=0)) == {1}


@pytest.mark.parametrize("logits", [[0.1, 3.0, -1.0, 2.9], [-5.0, -0.5, -9.0, -0.6]], ids=["mixed", "negative"])
@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_sample_next_token_at_a_vanishing_temperature_is_argmax(logits, temperature):
    assert sample(torch.tensor(logits), temperature=temperature) == 1


def test_sample_next_token_takes_the_first_token_whose_cumulative_probability_passes_the_places_uniform():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    cum = torch.softmax(logits.double() / 0.7, -1).cumsum(-1)
    for place in range(200):
        u = uniform(3, place)
        assert 0.0 <= u < 1.0
        expected = int((cum <= u * cum[-1]).sum())  # the tokens whose cumulative mass is still at or below u
        assert sample(logits, place, temperature=0.7, seed=3) == expected


def test_sample_next_token_draws_each_token_as_often_as_its_probability():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    probs = torch.softmax(logits, -1)
    n = 20_000
    counts = torch.bincount(torch.tensor(places(logits, n, seed=5)), minlength=5).double()
    # each count is binomial: within 4.5 standard deviations of n * p (a false alarm about once in 10^5 runs)
    assert ((counts - n * probs).abs() <= 4.5 * (n * probs * (1 - probs)).sqrt()).all(), counts / n


def test_uniform_depends_on_the_seed_and_the_place_only():
    assert uniform(7, 3) == uniform(7, 3)
    assert len({uniform(seed, place) for seed in range(30) for place in range(30)}) == 900


def test_sample_next_token_with_top_k_only_draws_from_the_k_best():
    logits = torch.tensor([1.0, 5.0, 0.0, 4.9, -2.0, 4.8])
    assert set(places(logits, 300, temperature=5.0, top_k=2)) == {1, 3}


def test_sample_next_token_with_top_k_above_the_vocabulary_keeps_everything():
    assert set(places(torch.zeros(4), 300, top_k=10)) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p, allowed", [(0.5, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_sample_next_token_with_top_p_keeps_the_smallest_set_reaching_that_mass(top_p, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(places(logits, 400, top_p=top_p)) == allowed


def test_sample_next_token_same_seed_same_token_and_other_seeds_other_tokens():
    logits = torch.zeros(1000)
    assert sample(logits, 4, seed=42) == sample(logits, 4, seed=42)
    assert len({sample(logits, 4, seed=s) for s in range(20)}) > 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_next_token_accepts_half_precision_logits(dtype):
    logits = torch.tensor([0.0, 10.0, 0.0], dtype=dtype)
    assert sample(logits, temperature=0.5, top_k=2, top_p=0.9) == 1


def test_min_p_keeps_exactly_the_tokens_at_least_that_fraction_as_likely_as_the_best():
    logits = torch.tensor([0.40, 0.30, 0.19, 0.11]).log()  # relative to the best: 1, 0.75, 0.475, 0.275
    assert set(places(logits, 400, min_p=0.5)) == {0, 1}
    assert set(places(logits, 400, min_p=0.45)) == {0, 1, 2}
    assert set(places(logits, 50, min_p=1.0)) == {0}


def test_min_p_zero_and_no_repetition_penalty_draw_exactly_as_without_them():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    assert places(logits, 40, temperature=0.9, min_p=0.0, repetition_penalty=1.0) == places(logits, 40, temperature=0.9)


PARAMS = [
    SamplingParams(seed=1),
    SamplingParams(seed=2, temperature=0.5, top_k=3),
    SamplingParams(seed=3, top_p=0.7),
    SamplingParams(temperature=0),
    SamplingParams(seed=4, min_p=0.3, repetition_penalty=1.3),
    SamplingParams(seed=5, presence_penalty=1.0, frequency_penalty=0.5),
]


def test_one_batched_draw_gives_each_row_what_it_gets_alone():
    logits = torch.randn(8, len(PARAMS), 40, generator=torch.Generator().manual_seed(2))
    together, alone = [Sampler(p, [1, 2]) for p in PARAMS], [Sampler(p, [1, 2]) for p in PARAMS]
    for step in logits:
        assert batched_sample(together, step) == [s(row) for s, row in zip(alone, step)]


@pytest.mark.parametrize("params", PARAMS)
def test_a_sampler_told_what_was_generated_continues_as_the_one_that_generated_it(params):
    """What an engine restarted mid-request relies on: the rest of the text is the text it would have had."""
    logits = torch.randn(12, 40, generator=torch.Generator().manual_seed(6))
    whole = Sampler(params, [1, 2])
    tokens = [whole(row) for row in logits]
    resumed = Sampler(params, [1, 2], generated=tokens[:5])
    assert [resumed(row) for row in logits[5:]] == tokens[5:]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = torch.tensor([2.0, -1.0, 3.0, -0.5])
    assert penalize(logits, mask([0, 1], 4), 2.0).tolist() == [1.0, -2.0, 3.0, -0.5]


def test_repetition_penalty_lowers_a_seen_tokens_probability_and_keeps_the_unseen_tokens_order():
    logits = torch.randn(30, generator=torch.Generator().manual_seed(5))
    seen = mask([3, 17], 30)
    before, after = logits.softmax(-1), penalize(logits, seen, 1.8).softmax(-1)
    assert (after[seen] < before[seen]).all()
    assert torch.equal(after[~seen].argsort(), before[~seen].argsort())


def test_repetition_penalty_turns_greedy_away_from_a_seen_token():
    logits = torch.tensor([3.0, 2.0, 0.5])
    assert sample(logits, temperature=0) == 0
    assert sample(logits, 0, mask([0], 3), temperature=0, repetition_penalty=2.0) == 1
    assert sample(logits, 0, mask([1], 3), temperature=0, repetition_penalty=2.0) == 0


def test_sampler_counts_the_prompt_and_then_each_token_it_drew_as_seen():
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7])  # halved, any of the first three falls below the rest
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0, 0])
    assert [sampler(logits) for _ in range(3)] == [1, 2, 3]  # 0 from the prompt, then its own draws
    assert sampler.seen.tolist() == [True] * 4


def test_sampler_without_a_penalty_keeps_no_seen_ids_and_draws_as_its_seed_and_places_do():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(4))
    sampler = Sampler(SamplingParams(temperature=0.8, seed=9), prompt=[1, 2])
    assert [sampler(logits) for _ in range(10)] == places(logits, 10, temperature=0.8, seed=9)
    assert sampler.seen is None
