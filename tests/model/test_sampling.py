"""The sampler: SamplingParams in, one token id out; and a request's Sampler, which keeps its state."""

import pytest
import torch

from model.sampling import Sampler, SamplingParams, penalize, sample_next_token


def mask(ids, size):
    """(size,) bool, True at each id in `ids`: the form in which the sampler takes the ids seen."""
    seen = torch.zeros(size, dtype=torch.bool)
    seen[torch.tensor(ids, dtype=torch.long)] = True
    return seen


def sample(logits, generator, seen=None, **params):
    return sample_next_token(logits, generator, SamplingParams(**params), seen)


def test_sample_next_token_at_temperature_zero_is_argmax_and_consumes_no_randomness():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample(torch.tensor([0.1, 3.0, -1.0, 2.9]), g, temperature=0) == 1
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("logits", [[0.1, 3.0, -1.0, 2.9], [-5.0, -0.5, -9.0, -0.6]], ids=["mixed", "negative"])
@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_sample_next_token_at_a_vanishing_temperature_is_argmax(logits, temperature):
    g = torch.Generator().manual_seed(0)
    assert sample(torch.tensor(logits), g, temperature=temperature) == 1


def test_sample_next_token_draws_as_multinomial_over_the_tempered_softmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        probs = torch.softmax(logits / 0.7, -1)
        expected = int(torch.multinomial(probs.unsqueeze(0), 1, generator=torch.Generator().manual_seed(seed)))
        assert sample(logits, torch.Generator().manual_seed(seed), temperature=0.7) == expected


def test_sample_next_token_with_top_k_only_draws_from_the_k_best():
    logits = torch.tensor([1.0, 5.0, 0.0, 4.9, -2.0, 4.8])
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, g, temperature=5.0, top_k=2) for _ in range(300)}
    assert drawn == {1, 3}


def test_sample_next_token_with_top_k_above_the_vocabulary_keeps_everything():
    logits = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, g, top_k=10) for _ in range(300)} == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p, allowed", [(0.5, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_sample_next_token_with_top_p_keeps_the_smallest_set_reaching_that_mass(top_p, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, g, top_p=top_p) for _ in range(400)} == allowed


def test_sample_next_token_same_seed_same_token_and_other_seeds_other_tokens():
    logits = torch.zeros(1000)
    assert sample(logits, torch.Generator().manual_seed(42)) == sample(logits, torch.Generator().manual_seed(42))
    assert len({sample(logits, torch.Generator().manual_seed(s)) for s in range(20)}) > 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_next_token_accepts_half_precision_logits(dtype):
    logits = torch.tensor([0.0, 10.0, 0.0], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, g, temperature=0.5, top_k=2, top_p=0.9) == 1


def test_min_p_keeps_exactly_the_tokens_at_least_that_fraction_as_likely_as_the_best():
    logits = torch.tensor([0.40, 0.30, 0.19, 0.11]).log()  # relative to the best: 1, 0.75, 0.475, 0.275
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, g, min_p=0.5) for _ in range(400)} == {0, 1}
    assert {sample(logits, g, min_p=0.45) for _ in range(400)} == {0, 1, 2}
    assert {sample(logits, g, min_p=1.0) for _ in range(50)} == {0}


def test_min_p_zero_and_no_repetition_penalty_draw_exactly_as_before():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    for seed in range(20):
        probs = torch.softmax(logits / 0.9, -1)
        expected = int(torch.multinomial(probs.unsqueeze(0), 1, generator=torch.Generator().manual_seed(seed)))
        assert (
            sample(logits, torch.Generator().manual_seed(seed), temperature=0.9, min_p=0.0, repetition_penalty=1.0)
            == expected
        )


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
    g = torch.Generator().manual_seed(0)
    assert sample(logits, g, temperature=0) == 0
    assert sample(logits, g, mask([0], 3), temperature=0, repetition_penalty=2.0) == 1
    assert sample(logits, g, mask([1], 3), temperature=0, repetition_penalty=2.0) == 0


def test_sampler_counts_the_prompt_and_then_each_token_it_drew_as_seen():
    logits = torch.tensor([3.0, 2.9, 2.8, 2.7])  # halved, any of the first three falls below the rest
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0, 0])
    assert [sampler(logits) for _ in range(3)] == [1, 2, 3]  # 0 from the prompt, then its own draws
    assert sampler.seen.tolist() == [True] * 4


def test_sampler_without_a_penalty_keeps_no_seen_ids_and_draws_as_its_seed_does():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(4))
    sampler = Sampler(SamplingParams(temperature=0.8, seed=9), prompt=[1, 2])
    g = torch.Generator().manual_seed(9)
    assert [sampler(logits) for _ in range(10)] == [sample(logits, g, temperature=0.8) for _ in range(10)]
    assert sampler.seen is None
