"""Prefix reuse in the GPT's cache (model/cache.py): a prompt starts from the longest prefix of it that a row holds,
and a prefix that prompts admitted together share is computed once. The text must be what it is without reuse."""

import torch
from helpers import Recorder, tiny_gpt

from model.cache import GPTCache
from model.engine import Engine, Request
from model.sampling import SamplingParams

VOCAB, CONTEXT = 40, 160


def model():
    return tiny_gpt(VOCAB, context_size=CONTEXT).double()  # double: the comparisons are of logic, not float noise


def prompts(prefix_length, tails, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, VOCAB, (prefix_length,), generator=g).tolist()
    return [prefix + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in tails]


def counted(engine):
    """The tokens each forward of the engine's model computes (rows x positions), in a list the test reads."""
    seen, forward = [], engine.model.forward

    def spy(x, *args, **kwargs):
        seen.append(x.numel())
        return forward(x, *args, **kwargs)

    engine.model.forward = spy
    return seen


def run(engine, *reqs, running=()):
    for req in reqs:
        engine.submit(req)
    reqs = [*running, *reqs]
    while any(req.emit.finish is None for req in reqs):
        engine.step()
    return [req.emit.tokens for req in reqs]


def request(prompt, n=6, **sampling):
    return Request(list(prompt), SamplingParams(max_new_tokens=n, **sampling), Recorder())


def both(script):
    """script(engine, count) run on an engine with reuse (the default) and one without (QUILL_PREFIX_CACHE=0's):
    (texts, tokens computed) of each."""
    engine = Engine(model(), 8)
    with_reuse = script(engine, counted(engine))
    engine = Engine(model(), 8, prefix_cache=False)
    return with_reuse, script(engine, counted(engine))


def test_prompts_admitted_together_compute_their_shared_prefix_once():
    def script(engine, seen):
        reqs = [
            request(p, temperature=t, seed=i) for i, (p, t) in enumerate(zip(prompts(90, [3, 5, 8, 2]), [0, 1, 0, 0.7]))
        ]
        texts = run(engine, *reqs)
        return texts, sum(seen[:2]) if len(seen) > 2 else seen

    (texts, computed), (plain, computed_plain) = both(script)
    assert texts == plain and all(len(t) == 6 for t in texts)
    # the leader (the shortest prompt, 92 tokens: the engine sorts them) computes 91 positions, then one forward
    # each prompt's rest past the shared 90, padded to the longest rest (8): 4 rows of 8
    assert computed == 91 + 4 * 8
    assert computed_plain > 3 * computed


def test_a_prompt_reuses_the_row_a_finished_request_left():
    first, second = prompts(50, [4, 7])

    def script(engine, seen):
        texts = run(engine, request(first))
        seen.clear()
        texts += run(engine, request(second))
        return texts, seen[0]  # the second's prefill

    (texts, computed), (plain, computed_plain) = both(script)
    assert texts == plain
    assert computed == 7 and computed_plain == 57  # the shared 50 tokens were copied, not computed


def test_a_prompt_reuses_a_running_requests_row():
    first, second = prompts(40, [2, 3])

    def script(engine, seen):
        long = request(first, n=30)
        engine.submit(long)
        for _ in range(5):
            engine.step()
        seen.clear()
        short = request(second, n=4, temperature=0.9, seed=3)
        texts = run(engine, short, running=[long])
        return texts, seen[0]

    (texts, computed), (plain, computed_plain) = both(script)
    assert texts == plain
    assert computed == 3 and computed_plain == 43


def test_a_prompt_with_a_long_held_prefix_prefills_beside_a_long_new_one_within_the_context():
    """Padded to the most new tokens of any row (100), a row's reused prefix and its new tokens must still fit the
    context (150 reused + 100 would be 250 positions of 160): it reuses 60, and the text is the same."""
    first, long_new = prompts(150, [0])[0], prompts(100, [0], seed=1)[0]

    def script(engine, seen):
        texts = run(engine, request(first, n=2))
        seen.clear()
        texts += run(engine, request(first + [7], n=5), request(long_new, n=5, temperature=0.8, seed=2))
        return texts, seen[0]

    (texts, computed), (plain, computed_plain) = both(script)
    assert texts == plain and [len(t) for t in texts] == [2, 5, 5]
    assert computed == 2 * 100 and computed_plain == 2 * 151


def test_rows_a_padded_compiled_step_writes_at_position_zero_are_no_longer_reused():
    gpt = model()
    cache = GPTCache(gpt, 8)
    cache.prefill(0, prompts(30, [1, 2, 3, 4]))
    assert [len(h) for h in cache.held[:4]] == [31, 32, 33, 34]

    class Step:  # what a compiled step of batch size 4 looks like to decode: it pads 2 rows to 4
        runs = {4: None}

        def __call__(self, tokens, lengths, longest):
            return torch.zeros(len(tokens), VOCAB, dtype=torch.double)

    cache.step = Step()
    cache.decode([5, 6])
    assert cache.held[0][-1] == 5 and cache.held[1][-1] == 6 and len(cache.held[1]) == 33
    assert cache.held[2] == [] and cache.held[3] == []  # their position 0 now holds the padding's junk


def test_the_prefix_cache_setting_reaches_the_engines_cache(checkpoints):
    from app.registry import load_served_model

    for on in (True, False):
        served = load_served_model(checkpoints["tiny-gpt"] / "model.safetensors", "cpu", 4, None, prefix_cache=on)
        assert served.engine.cache.reuse is on


def test_random_traffic_gives_the_same_text_with_and_without_reuse():
    """Prompts from a few shared prefixes (up to nearly the context) or none, random tails and lengths, arriving a few
    at a time into 8 slots that churn, some running past the context (the window slides): every text is the
    same with reuse as without, and reuse computed fewer tokens."""
    g = torch.Generator().manual_seed(7)
    bases = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (20, 70, 150)]
    arrivals = []
    for _ in range(80):
        pick = int(torch.randint(0, 4, (1,), generator=g))  # 3: a prompt like no other, 80 to 150 tokens
        base = (
            bases[pick]
            if pick < 3
            else torch.randint(0, VOCAB, (int(torch.randint(80, 150, (1,), generator=g)),), generator=g).tolist()
        )
        cut = int(torch.randint(0, 2 * len(base), (1,), generator=g))  # the whole base half the time
        tail = torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        prompt = (base[:cut] + tail)[-CONTEXT:]
        n = int(torch.randint(1, 60, (1,), generator=g))
        wait = int(torch.randint(0, 8, (1,), generator=g)) // 5 * 3  # mostly 0: several admitted together
        arrivals.append((wait, prompt, n, float(torch.rand(1, generator=g))))

    def script(engine, seen):
        reqs = []
        for wait, prompt, n, t in arrivals:
            for _ in range(wait):
                engine.step()
            reqs.append(request(prompt, n=n, temperature=t if t > 0.5 else 0.0, seed=len(reqs)))
            engine.submit(reqs[-1])
        while any(req.emit.finish is None for req in reqs):
            engine.step()
        return [req.emit.tokens for req in reqs], sum(seen)

    (texts, computed), (plain, computed_plain) = both(script)
    assert texts == plain and [len(t) for t in texts] == [n for _, _, n, _ in arrivals]
    assert computed < computed_plain
