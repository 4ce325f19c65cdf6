"""The engine, specified against the naive full forwards (GPT.generate's, for greedy decoding) and against itself."""

import threading
from pathlib import Path

import pytest
import torch
from helpers import Recorder, tiny_gpt, tiny_lstm
from service_helpers import CONTEXT, wait_until

from model import GPT, LSTM, Block, MultiHeadCausalSelfAttention
from model.cache import batch_buckets
from model.compiled import machine_identity, weights_key, writable_folder
from model.device import poisoned
from model.engine import Engine, Finished, Request
from model.sampling import SamplingParams, sample_next_token

VOCAB = 40
PROMPT = [1, 2, 3, 4]


def gpt64():
    # double: the oracle comparisons are about logic, not float noise
    return tiny_gpt(VOCAB, context_size=CONTEXT).double()


def lstm64():
    return tiny_lstm(VOCAB).double()


MODELS = pytest.mark.parametrize("make", [gpt64, lstm64], ids=["gpt", "lstm"])


def naive(model, prompt, n, seed, temperature=1.0):
    """Sampled decoding by full forwards, as GPT.generate decodes (the last context tokens; the LSTM reads all),
    each token drawn by the sampler at its place: the engine's reference for sampled text."""
    ids, params = list(prompt), SamplingParams(temperature=temperature, seed=seed)
    context = CONTEXT if isinstance(model, GPT) else None
    for place in range(n):
        logits, _ = model(torch.tensor([ids[-context:] if context else ids]))
        ids.append(sample_next_token(logits[0, -1], params, place))
    return ids[len(prompt) :]


def greedy(model, prompt, n):
    """Argmax decoding by full forwards over the context: the reference for temperature 0."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids[-CONTEXT:]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def request(prompt, n, seed=0, **sampling):
    return Request(list(prompt), SamplingParams(max_new_tokens=n, seed=seed, **sampling), Recorder())


def run_until_done(engine, *reqs):
    while any(r.emit.finish is None for r in reqs):
        engine.step()


@MODELS
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_tokens_equal_naive_full_forwards_for_the_same_seed(make, temperature):
    model = make()
    # GPT: the last token is still predicted from a context that fits. The LSTM has no context limit.
    n = CONTEXT + 1 - len(PROMPT) if make is gpt64 else 80
    expected = naive(model, PROMPT, n, seed=7, temperature=temperature)
    assert Engine(model, max_batch=4).generate(PROMPT, n, seed=7, temperature=temperature) == expected


@pytest.mark.parametrize(
    "make, layer, width",
    [(gpt64, Block, 32), (gpt64, MultiHeadCausalSelfAttention, 32), (lstm64, LSTM, VOCAB)],
    ids=["gpt-block", "gpt-attention", "lstm"],
)
def test_engine_runs_the_models_own_forward_so_a_changed_layer_changes_its_tokens(monkeypatch, make, layer, width):
    """The engine holds no copy of any layer's arithmetic: it follows an edit to the layer's forward."""
    model = make()
    before = Engine(model).generate(PROMPT, 20, temperature=0.0)
    real, shift = layer.forward, torch.randn(width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def shifted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return (out[0] + shift, out[1]) if isinstance(out, tuple) else out + shift

    monkeypatch.setattr(layer, "forward", shifted)
    after = Engine(model).generate(PROMPT, 20, temperature=0.0)
    assert after != before, "the edit changed nothing, so this test proved nothing"
    assert after == greedy(model, PROMPT, 20)


@MODELS
def test_engine_past_the_context_continues_and_returns_the_requested_count(make):
    n = 3 * CONTEXT + 5
    out = Engine(make(), max_batch=2).generate(PROMPT, n, seed=1)
    assert len(out) == n
    assert all(0 <= t < VOCAB for t in out)


def sliding_greedy(model, prompt, n):
    """Greedy decoding over the documented window: the last context tokens, and once that overflows,
    the last context // 2 + 1, growing again until the next overflow."""
    ids = list(prompt)
    start = max(0, len(ids) - CONTEXT)
    for _ in range(n):
        if len(ids) - start > CONTEXT:
            start = len(ids) - (CONTEXT // 2 + 1)
        logits, _ = model(torch.tensor([ids[start:]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("prompt_length", [4, 3 * CONTEXT])
def test_engine_past_the_context_slides_a_window_that_halves(prompt_length):
    model = gpt64()
    prompt = [i % VOCAB for i in range(prompt_length)]
    n = 3 * CONTEXT
    assert Engine(model).generate(prompt, n, temperature=0.0) == sliding_greedy(model, prompt, n)


def test_engine_prompt_longer_than_the_context_uses_its_last_context_tokens():
    model = gpt64()
    prompt = [i % VOCAB for i in range(3 * CONTEXT)]
    expected = naive(model, prompt[-CONTEXT:], 1, seed=5)
    assert Engine(model).generate(prompt, 1, seed=5) == expected


def record_prefills(monkeypatch, engine):
    """The lengths of the prompts each prefill forward took, one list per call."""
    calls, prefill = [], engine.cache.prefill

    def spy(first, seqs):
        calls.append([len(ids) for ids in seqs])
        return prefill(first, seqs)

    monkeypatch.setattr(engine.cache, "prefill", spy)
    return calls


@MODELS
def test_engine_prefills_requests_admitted_together_at_once_and_each_equals_it_alone(monkeypatch, make):
    model = make()
    # lengths that differ, so the shorter ones are padded; the last is longer than the context
    prompts = [[5] * 9, [1, 2, 3], [7], [i % VOCAB for i in range(17)], [i % VOCAB for i in range(CONTEXT + 5)]]
    alone = [Engine(model, max_batch=1).generate(p, 12, seed=i) for i, p in enumerate(prompts)]
    engine = Engine(model, max_batch=8)
    prefills = record_prefills(monkeypatch, engine)
    reqs = [request(p, 12, seed=i) for i, p in enumerate(prompts)]
    for req in reqs:
        engine.submit(req)
    run_until_done(engine, *reqs)
    assert [req.emit.tokens for req in reqs] == alone
    # shortest first, in one call; a GPT's long prompt cut to its last context tokens (then it slides),
    # an LSTM's whole (it runs its rows one by one: its state after padding would not be the prompt's)
    assert prefills[0] == [1, 3, 9, 17, CONTEXT + 5 if isinstance(model, LSTM) else CONTEXT]


def test_engine_prefill_groups_stay_within_their_token_budget_and_equal_greedy(monkeypatch):
    model = gpt64()
    engine = Engine(model, max_batch=8)
    engine.prefill_tokens = 8  # padded tokens a forward: 4 prompts of 2, then the 5 alone
    prefills = record_prefills(monkeypatch, engine)
    prompts = [[3, 4, 5, 6, 7], [1, 2], [2, 1], [4, 4], [9, 8]]
    reqs = [request(p, 10, temperature=0.0) for p in prompts]
    for req in reqs:
        engine.submit(req)
    run_until_done(engine, *reqs)
    assert prefills == [[2, 2, 2, 2], [5]]
    assert [req.emit.tokens for req in reqs] == [sliding_greedy(model, p, 10) for p in prompts]


@MODELS
def test_engine_temperature_zero_is_argmax_whatever_the_seed(make):
    model = make()
    engine = Engine(model)
    out = engine.generate(PROMPT, 20, seed=1, temperature=0.0)
    assert out == engine.generate(PROMPT, 20, seed=2, temperature=0.0)
    if make is gpt64:
        assert out == greedy(model, PROMPT, 20)


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=1e-9)], ids=["top_k=1", "tiny top_p"])
def test_engine_keeping_only_the_best_token_equals_greedy(sampling):
    engine = Engine(gpt64())
    assert engine.generate(PROMPT, 20, seed=3, temperature=1.0, **sampling) == engine.generate(
        PROMPT, 20, temperature=0.0
    )


@pytest.mark.parametrize("n", [1, 2, 17])
def test_engine_max_new_tokens_is_respected(n):
    req = request(PROMPT, n)
    engine = Engine(gpt64())
    engine.submit(req)
    run_until_done(engine, req)
    assert len(req.emit.tokens) == n
    assert req.emit.finish == Finished("length")


def test_engine_same_seed_same_tokens_alone_or_batched_with_others():
    model = tiny_gpt(VOCAB, context_size=CONTEXT)  # float32, as served
    # different prompts and lengths, some past the context (each row slides on its own)
    jobs = [([1, 2, 3], 90, 11), ([5] * 40, 30, 12), ([7, 8], 70, 13), ([9, 1, 9, 1], 50, 11)]
    alone = [Engine(model, max_batch=1).generate(p, n, seed=s) for p, n, s in jobs]

    sizes = []
    engine = Engine(model, max_batch=8, on_step=sizes.append)
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def client(i):
        prompt, n, seed = jobs[i]
        barrier.wait()
        results[i] = engine.generate(prompt, n, seed=seed)

    engine.start()
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.stop()
    assert max(sizes) > 1, "the requests never shared a batch, so this test proved nothing"
    assert results == alone


def test_engine_cancelled_request_leaves_the_batch_and_the_others_continue_unchanged():
    model = gpt64()
    expected = Engine(model).generate([6, 7], 25, seed=2)
    engine = Engine(model, max_batch=4)
    first, second = request(PROMPT, 100, seed=1), request([6, 7], 25, seed=2)
    engine.submit(first)
    engine.submit(second)
    for _ in range(5):
        engine.step()
    assert engine.counts() == (2, 0)

    first.cancel()  # slot 0 frees, and the second row moves into it
    engine.step()
    tokens_then = len(first.emit.tokens)
    assert first.emit.finish == Finished("cancelled")
    assert engine.counts() == (1, 0)

    run_until_done(engine, second)
    assert len(first.emit.tokens) == tokens_then
    assert second.emit.tokens == expected


def test_engine_request_cancelled_while_waiting_finishes_without_tokens():
    engine = Engine(gpt64())
    req = request(PROMPT, 10)
    engine.submit(req)
    req.cancel()
    engine.step()
    assert req.emit.events == [Finished("cancelled")]
    assert engine.counts() == (0, 0)


def test_engine_failed_step_ends_every_active_request_with_an_error_and_keeps_serving(monkeypatch):
    model = gpt64()
    engine = Engine(model, max_batch=4)
    reqs = [request(PROMPT, 50, seed=1), request([3, 3], 50, seed=2)]
    for r in reqs:
        engine.submit(r)
    engine.step()

    real_decode = engine.cache.decode
    calls = []

    def decode_failing_once(ids):
        calls.append(ids)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_decode(ids)

    monkeypatch.setattr(engine.cache, "decode", decode_failing_once)
    engine.step()
    for r in reqs:
        assert r.emit.finish.reason == "error"
        assert "injected failure" in r.emit.finish.error
    assert engine.counts() == (0, 0)

    assert engine.generate([6, 7], 25, seed=2) == Engine(model).generate([6, 7], 25, seed=2)


def test_engine_failed_step_in_the_thread_reaches_the_waiting_caller(monkeypatch):
    engine = Engine(gpt64())
    monkeypatch.setattr(engine.cache, "decode", lambda ids: 1 / 0)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            engine.generate(PROMPT, 5)
    finally:
        engine.stop()


def test_engine_stopped_with_requests_in_flight_ends_them_with_an_error():
    engine = Engine(gpt64(), max_batch=1)
    reqs = [request(PROMPT, 10_000), request(PROMPT, 10)]  # one running, one waiting
    for r in reqs:
        engine.submit(r)
    engine.start()
    assert wait_until(lambda: reqs[0].emit.tokens, timeout=30)
    engine.stop()
    assert [r.emit.finish for r in reqs] == [Finished("error", "engine stopped")] * 2


def test_engine_listener_that_raises_cancels_only_its_own_request():
    engine = Engine(gpt64())
    broken = request(PROMPT, 30)

    def raising(event):
        raise ValueError("client went away")

    broken.emit = raising
    healthy = request([6, 7], 30)
    engine.submit(broken)
    engine.submit(healthy)
    run_until_done(engine, healthy)
    assert healthy.emit.finish == Finished("length")
    assert len(healthy.emit.tokens) == 30
    assert engine.counts() == (0, 0)


def test_engine_refuses_an_empty_prompt():
    with pytest.raises(ValueError):
        Engine(gpt64()).submit(request([], 5))


def test_engine_request_at_a_vanishing_temperature_is_greedy_and_harms_no_one_in_its_batch():
    model = gpt64()
    engine = Engine(model)
    expected = engine.generate([6, 7], 30, seed=2)
    tiny, other = request(PROMPT, 30, temperature=1e-300), request([6, 7], 30, seed=2)
    engine.submit(tiny)
    engine.submit(other)
    run_until_done(engine, tiny, other)
    assert (tiny.emit.finish, other.emit.finish) == (Finished("length"),) * 2
    assert tiny.emit.tokens == greedy(model, PROMPT, 30)
    assert other.emit.tokens == expected


@MODELS
def test_engine_repetition_penalty_counts_the_prompt_and_every_generated_token_as_seen(make):
    from model.sampling import penalize

    model = make()
    ids = list(PROMPT)
    for _ in range(20):  # the reference: greedy over full forwards, penalizing everything seen so far
        logits, _ = model(torch.tensor([ids[-CONTEXT:]]))
        seen = torch.zeros(VOCAB, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        ids.append(int(penalize(logits[0, -1], seen, 3.0).argmax()))
    out = Engine(model).generate(PROMPT, 20, temperature=0.0, repetition_penalty=3.0)
    assert out == ids[len(PROMPT) :]
    assert out != Engine(model).generate(PROMPT, 20, temperature=0.0)  # the penalty changed something


def test_engine_marks_only_the_last_token_of_a_length_finish_as_last():
    req, engine = request(PROMPT, 5), Engine(gpt64())
    engine.submit(req)
    run_until_done(engine, req)
    assert [e.last for e in req.emit.events[:-1]] == [False] * 4 + [True]
    assert req.emit.events[-1] == Finished("length")


# the compiled decode step (QUILL_COMPILE)


def test_batch_buckets_are_powers_of_two_and_halfway_sizes_then_max_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(2) == [1, 2]
    assert batch_buckets(32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert batch_buckets(12) == [1, 2, 3, 4, 6, 8, 12]
    assert batch_buckets(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    for n in range(1, 200):  # at most a third of any batch size's bucket is padding
        buckets = batch_buckets(n)
        assert buckets == sorted(set(buckets)) and buckets[-1] == n
        assert all(
            min(b for b in buckets if b >= B) - B <= min(b for b in buckets if b >= B) // 3 for B in range(1, n + 1)
        )


@pytest.fixture(scope="module")
def compiled_engine(tmp_path_factory):
    """One compiled engine for the tests below (compiling takes seconds a bucket): max_batch 3, so
    batches of 3 run padded to no bucket and batches of 1 and 2 to their own. Its packages are kept in
    its own folder, returned third."""
    model, folder = gpt64(), tmp_path_factory.mktemp("compiled")
    engine = Engine(model, max_batch=3, compiled=True, compile_folder=folder)
    engine.warm_up()
    assert engine.compiled_sizes() == ([1, 2, 3], [1, 2, 3]), "compiling the decode step failed (see the log)"
    return model, engine, folder


@pytest.mark.slow
def test_compiled_engine_equals_greedy_alone_batched_and_past_the_context(compiled_engine):
    model, engine, _ = compiled_engine
    prompts = [PROMPT, [7, 8], [9] * (CONTEXT - 3)]  # the last slides its window within 30 tokens
    reqs = [request(p, 30, temperature=0.0) for p in prompts]
    for req in reqs:
        engine.submit(req)
    run_until_done(engine, *reqs)  # 3 rows, then 2 and 1 as they finish: every bucket, with padding
    for req, prompt in zip(reqs, prompts):
        assert req.emit.tokens == sliding_greedy(model, prompt, 30)
    assert engine.generate(PROMPT, 10, temperature=0.0) == sliding_greedy(model, PROMPT, 10)  # alone


@pytest.mark.slow
def test_compiled_engine_keeps_same_seed_same_tokens_alone_or_batched(compiled_engine):
    _, engine, _ = compiled_engine
    alone = engine.generate(PROMPT, 20, seed=5, temperature=0.8)
    mine, other = request(PROMPT, 20, seed=5, temperature=0.8), request([3, 3, 3], 25, seed=6)
    engine.submit(mine)
    engine.submit(other)
    run_until_done(engine, mine, other)
    assert mine.emit.tokens == alone


def compile_log(caplog, engine):
    """warm_up()'s INFO and WARNING lines from the quill logger."""
    caplog.clear()
    with caplog.at_level("INFO", logger="quill"):
        engine.warm_up()
    return [r.getMessage() for r in caplog.records if r.name == "quill"]


@pytest.mark.slow
def test_compiled_steps_are_kept_and_loaded_for_the_same_weights_only(compiled_engine, caplog):
    model, _, folder = compiled_engine
    again = Engine(model, max_batch=3, compiled=True, compile_folder=folder)
    lines = compile_log(caplog, again)
    assert lines == [f"loaded the compiled decode step for batch size {n} ({n} of 3)" for n in (1, 2, 3)]
    assert again.generate(PROMPT, 10, temperature=0.0) == greedy(model, PROMPT, 10)
    other = gpt64()
    with torch.no_grad():
        other.lm_head.weight.add_(0.5)  # other weights: other constants in the library
    lines = compile_log(caplog, Engine(other, max_batch=1, compiled=True, compile_folder=folder))
    assert lines == [f"compiling the decode step for batch size 1 (1 of 1, kept in {folder})"]


@pytest.mark.slow
def test_a_damaged_compiled_step_is_compiled_anew(compiled_engine, caplog, tmp_path):
    model, _, folder = compiled_engine
    packages = list(folder.glob("*.pt2"))
    for package in packages:
        (tmp_path / package.name).write_bytes(package.read_bytes()[:1000])  # cut short, as by a full disk
    engine = Engine(model, max_batch=1, compiled=True, compile_folder=tmp_path)
    lines = compile_log(caplog, engine)
    assert len(lines) == 2 and lines[0].endswith("could not be loaded (RuntimeError): compiling it anew")
    assert lines[1].startswith("compiling the decode step for batch size 1")
    assert engine.generate(PROMPT, 10, temperature=0.0) == greedy(model, PROMPT, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in packages)  # no partial file left


def test_a_failed_compile_decodes_eagerly_after_one_warning_and_leaves_no_file(monkeypatch, caplog, tmp_path):
    def broken(program, package_path, inductor_configs):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("no C++ compiler\n  while lowering a node\n  (more context)")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = gpt64()
    engine = Engine(model, max_batch=2, compiled=True, compile_folder=tmp_path)
    with caplog.at_level("WARNING", logger="quill"):
        engine.warm_up()
    assert engine.compiled_sizes() is None
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "compiling the decode step failed, decoding without it: RuntimeError: no C++ compiler"
    ]
    assert list(tmp_path.iterdir()) == []
    assert engine.generate(PROMPT, 10, temperature=0.0) == greedy(model, PROMPT, 10)


def test_the_compiled_steps_key_tells_weights_dtype_and_threads_apart():
    model = gpt64()
    key = weights_key(model).hexdigest()
    assert weights_key(gpt64()).hexdigest() == key  # the same weights, built again
    assert weights_key(model.float()).hexdigest() != key
    with torch.no_grad():
        model.pos_emb.weight[0, 0] += 1e-3
    assert weights_key(model).hexdigest() != key
    threads = torch.get_num_threads()
    one = machine_identity(torch.device("cpu"))
    try:
        torch.set_num_threads(threads + 1)
        assert machine_identity(torch.device("cpu")) != one
    finally:
        torch.set_num_threads(threads)


def test_an_unwritable_compile_folder_falls_back_to_a_temporary_one(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="quill"):
        folder = writable_folder(blocked / "compiled")
    assert folder.is_dir() and blocked not in folder.parents
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"cannot keep compiled steps in {blocked}/compiled"
    ]


def test_a_row_whose_logits_are_not_finite_ends_its_request_alone_and_the_others_go_on(monkeypatch):
    model = gpt64()
    engine = Engine(model, max_batch=4)
    real, steps = engine.cache.decode, []

    def nan_in_row_1_at_the_third_step(ids):
        logits = real(ids)
        steps.append(len(ids))
        if len(steps) == 3:
            logits[1, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.cache, "decode", nan_in_row_1_at_the_third_step)
    reqs = [request(PROMPT, 20, seed=i) for i in range(3)]
    engine.waiting.extend(reqs)
    run_until_done(engine, *reqs)
    assert reqs[1].emit.finish.reason == "error" and "NaN" in reqs[1].emit.finish.error
    assert len(reqs[1].emit.tokens) == 3  # its first (from the prefill) and two decode steps' tokens
    for i in (0, 2):
        assert reqs[i].emit.finish == Finished("length")
        assert reqs[i].emit.tokens == Engine(model).generate(PROMPT, 20, seed=i)


@pytest.mark.parametrize("exits", [True, False], ids=["engine-process", "engine-thread"])
def test_a_device_error_ends_an_engine_process_for_its_supervisor_and_an_engine_threads_requests(monkeypatch, exits):
    engine = Engine(gpt64(), exit_on_device_error=exits)

    def device_assert(ids):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(engine.cache, "decode", device_assert)
    req = request(PROMPT, 5)
    engine.waiting.append(req)
    if exits:  # the process exits; its supervisor resumes the request in a new one
        with pytest.raises(RuntimeError, match="device-side assert"):
            engine.step()
        assert req.emit.finish is None
    else:
        engine.step()
        assert req.emit.finish.reason == "error" and "device-side assert" in req.emit.finish.error
    assert not poisoned(torch.OutOfMemoryError("CUDA error: out of memory"))  # that one is the request's alone
