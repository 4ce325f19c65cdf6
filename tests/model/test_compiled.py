"""The compiled decode step as a server builds it by default: in the background. A started engine serves eagerly
at once, a builder process (python -m model.compiled) compiles each batch size, and the engine switches to each
package as it is loaded; every package reads the engine's own weights, not a copy; kept packages load without
a builder; and a compile that cannot happen leaves one line in the log and an engine that decodes eagerly."""

import logging
import subprocess
import sys

import pytest
import torch
from helpers import tiny_gpt
from service_helpers import REPO, wait_until
from torch._inductor import cpp_builder
from torch._inductor.exc import InvalidCxxCompiler

from model import load_checkpoint, save_checkpoint
from model.compiled import missing_tools
from model.engine import Engine
from model.tokenizer import ByteTokenizer

JOBS = [([1, 2, 3], 40, dict(temperature=0)), ([5] * 20, 30, dict(seed=2, temperature=0.7, top_k=5))]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "model.safetensors"
    save_checkpoint(path, tiny_gpt(256, context_size=32), ByteTokenizer(), {})
    return path


def started(weights, folder, max_batch=3):
    """A compiled engine started on the checkpoint at `weights` (as the server's are), and its model."""
    model = load_checkpoint(weights)[0]
    engine = Engine(model, max_batch, compiled=True, compile_folder=folder, weights=weights, threads=1)
    engine.start()
    return model, engine


def all_built(engine):
    sizes = engine.compiled_sizes()
    return sizes is not None and sizes[0] == sizes[1] and not engine.cache.step.building


def run_jobs(engine):
    return [engine.generate(p, n, **s) for p, n, s in JOBS]


@pytest.fixture(scope="module")
def kept(weights, tmp_path_factory):
    """The folder a first engine compiled its packages into, and what it generated meanwhile and after."""
    folder = tmp_path_factory.mktemp("kept")
    model, engine = started(weights, folder)
    try:
        during = run_jobs(engine)
        building = engine.cache.step.building  # a builder imports torch for seconds before it compiles anything
        assert wait_until(lambda: all_built(engine), timeout=600), engine.cache.step.failed
        after = run_jobs(engine)
    finally:
        engine.stop()
    return folder, during, building, after


@pytest.mark.slow
def test_a_started_engine_serves_while_it_compiles_then_runs_each_batch_sizes_package(weights, kept):
    folder, during, building, after = kept
    eager = run_jobs(Engine(load_checkpoint(weights)[0], 3))
    assert building and during == eager  # served eagerly, at once
    assert after == eager
    assert len(list(folder.glob("decode-*.pt2"))) == 3  # batch sizes 1, 2 and 3, kept
    assert not list(folder.glob("*partial*"))


@pytest.mark.slow
def test_kept_packages_load_without_a_builder_and_share_the_engines_weights(weights, kept, caplog):
    folder = kept[0]
    with caplog.at_level(logging.INFO, logger="quill"):
        model, engine = started(weights, folder)
        try:
            assert wait_until(lambda: all_built(engine), timeout=120)
            assert engine.cache.step.builder is None
            assert run_jobs(engine) == kept[3]
            with torch.no_grad():  # the packages read the model's tensors: a change to them changes the steps
                model.ln_f.weight.mul_(-3.0)
            changed = run_jobs(engine)
        finally:
            engine.stop()
    assert "loaded the compiled decode step for batch sizes 1, 2, 3" in caplog.messages
    assert not [m for m in caplog.messages if m.startswith("compiling")]
    assert changed != kept[3]
    assert changed == run_jobs(Engine(model, 3))  # eager, on the changed weights


def test_without_a_compiler_an_engine_decodes_eagerly_after_one_line(weights, tmp_path, caplog, monkeypatch):
    def no_compiler():  # what inductor raises when none of its compilers (config.cpp.cxx) runs
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert missing_tools(torch.device("cpu")) == "no C++ compiler (g++, or $CXX) found"
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # the builder's: no g++ on it
    with caplog.at_level(logging.WARNING, logger="quill"):
        model, engine = started(weights, tmp_path / "kept")
        try:
            assert run_jobs(engine) == run_jobs(Engine(model, 3))
            assert wait_until(lambda: engine.compiled_sizes() is None, timeout=120)
        finally:
            engine.stop()
    why = "no C++ compiler (g++, or $CXX) found"
    assert caplog.messages == [f"compiling the decode step failed, decoding without it: {why}"]


@pytest.mark.slow
def test_a_builder_that_fails_leaves_one_line_and_an_eager_engine(weights, tmp_path, caplog):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(weights.read_bytes()[:5000])  # the builder loads this; the engine, a good copy
    model = load_checkpoint(weights)[0]
    engine = Engine(model, 2, compiled=True, compile_folder=tmp_path / "kept", weights=broken, threads=1)
    with caplog.at_level(logging.WARNING, logger="quill"):
        engine.start()
        try:
            assert wait_until(lambda: engine.compiled_sizes() is None, timeout=120)
            assert run_jobs(engine) == run_jobs(Engine(model, 2))
        finally:
            engine.stop()
    (line,) = caplog.messages
    assert line.startswith(f"compiling the decode step failed, decoding without it: CheckpointError: {broken}")


@pytest.mark.slow
def test_the_builder_says_what_it_built_and_ends_when_its_parent_closes_its_stdin(weights, tmp_path):
    command = [sys.executable, "-m", "model.compiled", str(weights), "--sizes", "1", "--threads", "1"]
    command += ["--folder", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stdout) == (0, "built 1\n")
    (package,) = tmp_path.glob("decode-*.pt2")
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout) == (0, "built 1\n")
    assert list(tmp_path.glob("decode-*.pt2")) == [package]
    child = [*command[:5], "1,2", *command[6:], "--child"]  # as an engine starts it
    waiting = subprocess.Popen(child, cwd=REPO, stdin=subprocess.PIPE)
    waiting.stdin.close()  # as when the engine that started it dies: it ends before compiling batch size 2
    assert waiting.wait(timeout=120) == 0
    assert list(tmp_path.glob("decode-*.pt2")) == [package]
