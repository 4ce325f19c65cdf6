"""The engine in a child process: the same tokens as the Engine in this one, cancels that reach it, and a
child that cannot start or dies is an error that names it, never a hang."""

import os
import signal
import threading

import pytest
import torch
from helpers import tiny_gpt
from service_helpers import wait_until

from model import save_checkpoint
from model.engine import Engine, Finished, Request, Token
from model.engine_process import EngineProcess
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer

JOBS = [
    ([1, 2, 3], 40, dict(seed=1)),
    ([5] * 20, 30, dict(seed=2, temperature=0.7, top_k=5)),
    ([7], 50, dict(temperature=0)),
]


class Recorder:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    @property
    def tokens(self):
        return [e.id for e in self.events if isinstance(e, Token)]


def all_jobs_together(engine):
    """Submit every job of JOBS at once and wait for all to finish; their Requests."""
    reqs = [Request(p, SamplingParams(max_new_tokens=n, **s), Recorder()) for p, n, s in JOBS]
    for req in reqs:
        engine.submit(req)
    for req in reqs:
        assert req.emit.done.wait(60)
    return reqs


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-process") / "model.safetensors"
    save_checkpoint(path, tiny_gpt(256, context_size=32), ByteTokenizer(), {})
    return path


@pytest.fixture(scope="module")
def engine(weights):
    engine = EngineProcess(weights, "cpu", torch.float32, max_batch=4, threads=1)
    engine.start()
    yield engine
    engine.stop()


def test_the_child_generates_what_the_engine_in_this_process_does_alone_and_together(engine, weights):
    model = tiny_gpt(256, context_size=32)
    here = [Engine(model, max_batch=1).generate(p, n, **s) for p, n, s in JOBS]
    assert [engine.generate(p, n, **s) for p, n, s in JOBS] == here
    reqs = all_jobs_together(engine)
    assert [req.emit.tokens for req in reqs] == here
    assert [req.emit.events[-1].reason for req in reqs] == ["length"] * 3
    assert engine.counts() == (0, 0)


@pytest.mark.slow
def test_a_compiled_child_picks_the_right_bucket_for_each_batch_size(weights):
    """The child runs one compiled package a batch size: batches of 3, then 2, then 1 as the jobs finish
    must each run their own, over the right rows of the cache."""
    model = tiny_gpt(256, context_size=32)
    here = [Engine(model, max_batch=1).generate(p, n, **s) for p, n, s in JOBS]
    engine = EngineProcess(weights, "cpu", torch.float32, max_batch=3, threads=1, compiled=True)
    engine.start()
    try:
        reqs = all_jobs_together(engine)
        assert [req.emit.tokens for req in reqs] == here
        assert [engine.generate(p, n, **s) for p, n, s in JOBS] == here
    finally:
        engine.stop()


def test_a_cancel_reaches_the_child_and_the_others_go_on(engine):
    long, short = (
        Request([1], SamplingParams(max_new_tokens=100_000), Recorder()),
        Request([2], SamplingParams(max_new_tokens=30), Recorder()),
    )
    engine.submit(long)
    engine.submit(short)
    assert wait_until(lambda: len(long.emit.tokens) > 5, timeout=30)
    long.cancel()
    assert long.emit.done.wait(30) and long.emit.events[-1].reason == "cancelled"
    assert short.emit.done.wait(30) and short.emit.tokens == engine.generate([2], 30)
    assert len(long.emit.tokens) < 100_000


def test_an_empty_prompt_is_refused_here(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(Request([], SamplingParams(), Recorder()))


def test_a_child_that_cannot_load_its_weights_fails_start_naming_why(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match="the engine process could not start: .*"):
        EngineProcess(bad, "cpu", torch.float32).start()


def engine_generating(weights):
    """A started EngineProcess of its own, and a request it has begun generating (and would not finish soon)."""
    engine = EngineProcess(weights, "cpu", torch.float32, max_batch=2, threads=1)
    engine.start()
    running = Request([1], SamplingParams(max_new_tokens=100_000), Recorder())
    engine.submit(running)
    assert wait_until(lambda: running.emit.tokens, timeout=30)
    return engine, running


def events_of_a_late_request(engine):
    late = Request([1], SamplingParams(max_new_tokens=3), Recorder())
    engine.submit(late)
    return late.emit.events


def test_a_child_that_dies_ends_its_requests_with_an_error_and_refuses_new_ones(weights):
    engine, running = engine_generating(weights)
    os.kill(engine.proc.pid, signal.SIGKILL)
    assert running.emit.done.wait(30)
    assert running.emit.events[-1] == Finished("error", f"the engine process exited (code {-signal.SIGKILL})")
    assert events_of_a_late_request(engine) == [
        Finished("error", f"the engine process exited (code {-signal.SIGKILL})")
    ]
    engine.stop()  # and stopping it then returns


def test_a_stopped_engine_ends_what_it_was_running_and_refuses_what_comes_after(weights):
    engine, running = engine_generating(weights)
    engine.stop()
    assert running.emit.events[-1] == Finished("error", "engine stopped")
    assert events_of_a_late_request(engine) == [Finished("error", "the engine process exited (code 0)")]
