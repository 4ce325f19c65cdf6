"""The engine in a child process: the same tokens as the Engine in this one, cancels that reach it, and a
child that cannot start or dies is an error that names it, never a hang."""

import multiprocessing.connection
import os
import signal
import threading
import time

import pytest
import torch
from helpers import tiny_gpt
from service_helpers import wait_until

from model import engine_process, save_checkpoint
from model.engine import Engine, Finished, Outcome, Request, Token
from model.engine_process import EngineProcess
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer

JOBS = [
    ([1, 2, 3], 40, dict(seed=1)),
    ([5] * 20, 30, dict(seed=2, temperature=0.7, top_k=5)),
    ([7], 50, dict(temperature=0)),
]


class Recorder(Outcome):
    """The events of one request, and `done` once it has finished."""

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
    """The child runs one compiled package a batch size, once its background compile has built them: batches of
    3, then 2, then 1 as the jobs finish must each run their own, over the right rows of the cache."""
    model = tiny_gpt(256, context_size=32)
    here = [Engine(model, max_batch=1).generate(p, n, **s) for p, n, s in JOBS]
    engine = EngineProcess(weights, "cpu", torch.float32, max_batch=3, threads=1, compiled=True)
    engine.start()  # serving at once, eagerly, while its steps compile in the background
    try:
        assert engine.compiled_sizes() == ([], [1, 2, 3])
        assert wait_until(lambda: engine.compiled_sizes() == ([1, 2, 3], [1, 2, 3]), timeout=600)
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


def supervised(weights, max_batch=2, **kwargs):
    """A started EngineProcess of its own, recording its restarts and whether it gave up."""
    seen = {"restarts": [], "gave_up": []}
    engine = EngineProcess(
        weights,
        "cpu",
        torch.float32,
        max_batch=max_batch,
        threads=1,
        context=32,
        on_restart=lambda kind, why: seen["restarts"].append(kind),
        on_give_up=seen["gave_up"].append,
        **kwargs,
    )
    engine.start()
    return engine, seen


def started(engine, n, **sampling):
    """A request of n tokens submitted to `engine`, once it has delivered a few."""
    req = Request([1, 2], SamplingParams(max_new_tokens=n, **sampling), Recorder())
    engine.submit(req)
    assert wait_until(lambda: len(req.emit.tokens) >= 5, timeout=60)
    return req


FAULT_FREE = dict(seed=3, temperature=0.8, top_k=50)  # sampled, and past the context (32): the window slides


def fault_free(n):
    return Engine(tiny_gpt(256, context_size=32), max_batch=1).generate([1, 2], n, **FAULT_FREE)


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_child_that_dies_or_hangs_is_replaced_and_its_stream_ends_with_its_fault_free_text(weights, fault):
    engine, seen = supervised(weights, timeout=3)
    try:
        req = started(engine, 400, **FAULT_FREE)
        os.kill(engine.child.proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        assert wait_until(lambda: engine.down is not None, timeout=10)  # noticed: a hang within the timeout
        assert req.emit.done.wait(60)
        assert req.emit.events[-1] == Finished("length")
        assert req.emit.tokens == fault_free(400)
        assert seen["restarts"] == ["died" if fault == "kill" else "hung"] and engine.down is None
        assert engine.generate([5], 10, temperature=0) == Engine(tiny_gpt(256, context_size=32)).generate(
            [5], 10, temperature=0
        )
    finally:
        engine.stop()


def test_an_idle_child_that_hangs_is_noticed_before_any_request_comes(weights, caplog):
    engine, seen = supervised(weights, timeout=2)
    try:
        os.kill(engine.child.proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: seen["restarts"] == ["hung"], timeout=30)
        assert "with a ping waiting" in caplog.text
        assert wait_until(lambda: engine.down is None, timeout=60)
        assert len(engine.generate([5], 3)) == 3
    finally:
        engine.stop()


def kill_and_wait_for_the_next(engine):
    old = engine.child
    os.kill(old.proc.pid, signal.SIGKILL)
    assert wait_until(lambda: engine.child is not old and engine.down is None, timeout=60)


def test_a_request_begun_at_two_deaths_with_no_progress_between_ends_as_engine_failed(weights):
    engine, seen = supervised(weights)
    try:
        # a long prompt to score: begun at once, and it makes no progress a client sees until it is whole
        scoring = Request([7] * 40_000, SamplingParams(max_new_tokens=0, prompt_logprobs=1), Recorder())
        engine.submit(scoring)
        (tracked,) = engine.tracked.values()
        for _ in range(2):
            assert wait_until(lambda: tracked.started, timeout=60)
            kill_and_wait_for_the_next(engine)
        assert scoring.emit.done.wait(30)
        assert len(scoring.emit.events) == 1 and scoring.emit.events[0].code == "engine_failed"
        assert "failed twice" in scoring.emit.events[0].error
        assert seen["restarts"] == ["died", "died"]
        assert len(engine.generate([5], 3)) == 3  # and the engine serves
    finally:
        engine.stop()


def test_requests_that_wait_their_turn_or_were_cancelled_through_deaths_are_not_blamed(weights):
    engine, _ = supervised(weights, max_batch=1)
    try:
        running = started(engine, 100_000, **FAULT_FREE)
        waiting = Request([1, 2], SamplingParams(max_new_tokens=40, **FAULT_FREE), Recorder())  # behind it
        engine.submit(waiting)
        for _ in range(2):
            progress = len(running.emit.tokens)
            kill_and_wait_for_the_next(engine)
            assert wait_until(lambda n=progress: len(running.emit.tokens) > n + 2, timeout=60)
        assert not waiting.emit.done.is_set()  # still waiting its turn, not failed
        os.kill(engine.child.proc.pid, signal.SIGSTOP)  # a cancel the child never reads, then its death
        running.cancel()
        kill_and_wait_for_the_next(engine)
        assert running.emit.done.wait(30) and running.emit.events[-1] == Finished("cancelled")
        assert running.emit.tokens == fault_free(len(running.emit.tokens))
        assert waiting.emit.done.wait(60) and waiting.emit.events[-1] == Finished("length")
        assert waiting.emit.tokens == fault_free(40)
    finally:
        engine.stop()


def test_a_crash_loop_gives_up_ending_every_request_and_refusing_new_ones(weights, tmp_path, caplog):
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(weights.read_bytes())
    engine, seen = supervised(copy)
    try:
        req = started(engine, 100_000)
        copy.write_bytes(b"not safetensors")  # every new child fails to start: a crash loop
        os.kill(engine.child.proc.pid, signal.SIGKILL)
        assert req.emit.done.wait(120)
        assert req.emit.events[-1].code == "engine_failed" and "5 times" in req.emit.events[-1].error
        assert len(seen["gave_up"]) == 1 and engine.failed and engine.down
        assert seen["restarts"] == ["died"] * 5  # the kill, then four children that could not start
        assert "Traceback" not in caplog.text  # a line each, not the child's traceback
        late = Request([1], SamplingParams(max_new_tokens=3), Recorder())
        engine.submit(late)
        assert late.emit.events == [Finished("error", engine.failed, "engine_failed")]
    finally:
        engine.stop()


def test_a_stopped_engine_ends_what_it_was_running(weights):
    engine, _ = supervised(weights)
    running = started(engine, 100_000)
    engine.stop()
    assert running.emit.events[-1] == Finished("error", "engine stopped")


def test_stop_warns_of_a_child_that_would_not_stop_only_after_the_time_it_names(weights, monkeypatch, caplog):
    """Only one thread ever waits on the child. Two waiting on one pid made a child that had exited look alive
    to the one whose waitpid failed, and stop() then warned and killed it at once (seen at shutdown). Here the
    interleaving that did it is forced: stop's thread sees the child gone a moment after any other thread,
    and another thread that reaps it takes its time to record it."""
    real_waitpid, real_wait = os.waitpid, multiprocessing.connection.wait

    def reaped_late(pid, flags):
        out = real_waitpid(pid, flags)
        if out[0] and threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return out

    def seen_late(objects, timeout=None):
        ready = real_wait(objects, timeout)
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.2)
        return ready

    engine, _ = supervised(weights)
    started(engine, 100_000)
    monkeypatch.setattr(os, "waitpid", reaped_late)
    monkeypatch.setattr(multiprocessing.connection, "wait", seen_late)
    began = time.monotonic()
    engine.stop(timeout=20)
    assert "did not stop" not in caplog.text
    assert time.monotonic() - began < 20


@pytest.mark.parametrize("window", [60.0, 0.0])
def test_a_new_child_that_hangs_as_it_starts_is_a_death_too(weights, caplog, monkeypatch, window):
    """A restarted child that says nothing for the timeout while it loads is killed and counted, so a server whose
    engines cannot come back gives up rather than staying down with /health at 200: within the crash window, or
    (window 0: starts too slow to crowd it) after as many failures in a row."""
    monkeypatch.setattr(engine_process, "CRASH_WINDOW", window)
    engine, seen = supervised(weights, timeout=2)
    first, stopped = engine.child, []

    def stop_each_new_child():  # each is stopped while it imports torch, long before it could say it is ready
        while not seen["gave_up"]:
            child = engine.child
            if child is not first and child not in stopped and child.proc.pid:
                os.kill(child.proc.pid, signal.SIGSTOP)
                stopped.append(child)
            time.sleep(0.002)

    stopper = threading.Thread(target=stop_each_new_child)
    stopper.start()
    try:
        limit = max(2, 3 * engine.first_start)  # a restart may take thrice the first start, however short the timeout
        os.kill(first.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: seen["gave_up"], timeout=60 + 5 * limit)  # a loaded machine's starts are slower
        assert seen["restarts"] == ["died"] * 5 and len(stopped) == 4
        assert caplog.text.count(f"the engine process sent nothing for {limit:g} s while starting") == 4
        assert ("failed 5 times" if window else "failed 5 times in a row") in caplog.text  # (within 60 s, if quick)
    finally:
        stopper.join()
        engine.stop()


def test_a_prompt_being_scored_when_the_child_dies_is_scored_anew_and_delivered(weights):
    engine, _ = supervised(weights)
    try:
        scoring = Request([7] * 20_000, SamplingParams(max_new_tokens=0, prompt_logprobs=1), Recorder())
        engine.submit(scoring)
        (tracked,) = engine.tracked.values()
        assert wait_until(lambda: tracked.started, timeout=60)
        kill_and_wait_for_the_next(engine)
        assert scoring.emit.done.wait(60) and scoring.emit.events[-1] == Finished("length")
        assert len(scoring.emit.events[0].logprobs) == 20_000  # its PromptLogprobs, not lost with the child
    finally:
        engine.stop()


def test_a_sigterm_to_the_process_group_leaves_the_child_to_the_server(weights):
    """make serve and systemd send SIGTERM to the whole group: the server drains, then stops the child itself."""
    engine, seen = supervised(weights)
    try:
        os.kill(engine.child.proc.pid, signal.SIGTERM)
        time.sleep(1)
        assert engine.child.proc.is_alive() and seen["restarts"] == [] and len(engine.generate([5], 3)) == 3
    finally:
        engine.stop()


def test_a_request_submitted_after_stop_ends_at_once(weights):
    engine, _ = supervised(weights)
    engine.stop()
    late = Request([1], SamplingParams(max_new_tokens=3), Recorder())
    engine.submit(late)
    assert late.emit.events == [Finished("error", "engine stopped")]
