"""A step's logprobs, read back for all rows at once, are what each row's own log-softmax and top-k give."""

from types import SimpleNamespace

import torch

from model.scoring import token_logprobs, top_logprobs


def test_token_logprobs_of_the_rows_that_asked_equal_each_rows_own():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    logits[2, 7] = 10.0
    asks = [None, 0, 3, None, 50]  # no logprobs; the token's only; 3 alternatives; the whole vocabulary
    reqs = [SimpleNamespace(params=SimpleNamespace(logprobs=k)) for k in asks]
    tokens = [4, 11, 7, 0, 49]
    got = token_logprobs(reqs, [0, 1, 2, 4], logits, tokens)  # row 3 is not among the rows (a failed one)
    assert sorted(got) == [1, 2, 4]
    for i in got:
        own = torch.log_softmax(logits[i].float(), -1)
        assert got[i][0] == float(own[tokens[i]])
        assert got[i][1] == top_logprobs(own[None], asks[i])[0]
    assert token_logprobs(reqs, [0, 3], logits, tokens) == {}
