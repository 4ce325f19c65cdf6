"""--resume: a run goes on as it was started (its max-iters, schedule, evaluation, batches, threads), with
the options given on the command line in place of its own, each said in one line; a finished run says so."""

import itertools
import subprocess

import pytest
from helpers import REPO, TINY_TRAIN_ARGS, read_log, trainer_command, trainer_env

from model.checkpoint import read_safetensors
from train import loop as loop_module
from train.config import parse_config
from train.loop import train

# Settings unlike the defaults, so that a resumed run that fell back to them would be seen.
RUN = [
    *TINY_TRAIN_ARGS,  # batch 4, evaluation over 2 batches, warmup 2: the defaults are 12, 200, 100
    "--max-iters",
    "8",
    "--eval-interval",
    "3",
    "--gradient-accumulation-steps",
    "2",
    "--learning-rate",
    "2e-3",
    "--min-lr",
    "3e-4",
    "--dropout",
    "0.1",
    "--threads",
    "1",
]


def first_run(corpus, out, *extra):
    train(parse_config(["--data", str(corpus), "--out", str(out), *RUN, *map(str, extra)]))


def resumed(corpus, out, *extra):
    """The config of `python -m train --data CORPUS --out OUT --resume EXTRA`: no other option."""
    return parse_config(["--data", str(corpus), "--out", str(out), "--resume", *map(str, extra)])


def state(out):
    return read_safetensors(out / "resume.safetensors")


def settings(meta):
    """A run's settings as its resume state records them, less those that each command gives afresh."""
    return {k: v for k, v in meta["train_config"].items() if k not in ("out", "resume", "given")}


def files(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def log_rows(out):
    return [(r["kind"], r["iter"], r["tokens"], r.get("loss"), r.get("val_loss"), r["lr"]) for r in read_log(out)]


def stop_at_train_step(monkeypatch, n):
    """Ctrl-C as the run's `n`th training step begins."""
    real, calls = loop_module.train_step, itertools.count(1)

    def step(*args):
        if next(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(loop_module, "train_step", step)


def test_a_stopped_run_resumed_with_no_other_options_ends_as_the_run_would_have(corpus, tmp_path, monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    first_run(corpus, whole)
    stop_at_train_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        first_run(corpus, stopped)
    monkeypatch.undo()
    assert state(stopped)[1]["iter"] == 3  # the evaluation at iteration 3 saved it

    train(resumed(corpus, stopped))

    (whole_tensors, whole_meta), (tensors, meta) = state(whole), state(stopped)
    assert settings(meta) == settings(whole_meta)
    assert (meta["iter"], meta["tokens_seen"]) == (whole_meta["iter"], whole_meta["tokens_seen"]) == (8, 8 * 2 * 4 * 16)
    assert tensors.keys() == whole_tensors.keys()
    for name in whole_tensors:  # weights, optimizer moments and RNG states, bit for bit
        assert tensors[name].equal(whole_tensors[name]), name
    assert log_rows(stopped) == log_rows(whole)  # the same steps, learning rates and evaluations


def test_options_given_with_resume_replace_the_runs_and_each_is_said_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    first_run(corpus, out)
    before = settings(state(out)[1])
    capsys.readouterr()

    train(resumed(corpus, out, "--max-iters", 12, "--eval-iters", 3, "--batch-size", 4))  # batch 4: as it was

    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--resume:")]
    assert said == [
        "--resume: --max-iters 12 in place of the run's 8",
        "--resume: --eval-iters 3 in place of the run's 2",
    ]
    meta = state(out)[1]
    assert meta["iter"] == 12
    assert settings(meta) == {**before, "max_iters": 12, "eval_iters": 3}
    assert [r["iter"] for r in read_log(out) if r["kind"] == "eval"] == [0, 3, 6, 8, 9, 12]  # every third, and the ends


def test_resuming_a_finished_run_says_it_is_finished_trains_nothing_and_exits_0(corpus, tmp_path):
    out = tmp_path / "run"
    first_run(corpus, out)
    before = files(out)
    proc = subprocess.run(
        trainer_command("--data", corpus, "--out", out, "--resume"),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        f"{out} is finished: it has run all its 8 iterations, so nothing was trained; "
        "to train it further, pass --resume with a --max-iters above 8"
    ]
    assert proc.stderr == "" and files(out) == before


def test_resuming_with_max_iters_below_the_runs_iteration_is_refused_and_changes_nothing(corpus, tmp_path):
    out = tmp_path / "run"
    first_run(corpus, out)
    before = files(out)
    with pytest.raises(SystemExit, match="--max-iters 5 is below iteration 8, which the run in .* has reached"):
        train(resumed(corpus, out, "--max-iters", 5))
    assert files(out) == before


def test_resuming_with_another_model_shape_is_refused_naming_the_option(corpus, tmp_path):
    out = tmp_path / "run"
    first_run(corpus, out)
    before = files(out)
    with pytest.raises(SystemExit, match=r"keeps its model, shape and tokenizer: drop --n-layer 3 \(the run's: 2\)"):
        train(resumed(corpus, out, "--max-iters", 12, "--n-layer", 3))
    assert files(out) == before
