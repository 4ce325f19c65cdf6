"""SIGKILL a real training run in the middle of its saves, again and again, resuming each time.

Every step saves (evaluation interval 1), and each kill lands while a temporary file of a save exists,
after a random number of saves and a random delay. After each kill the checkpoint and the resume state
must load whole and never go back in time; the next start must delete the temporary files left behind.
"""

import os
import random
import signal
import subprocess
import time

import pytest
from helpers import REPO, TINY_TRAIN_ARGS, trainer_command, trainer_env

from model import load_checkpoint
from model.checkpoint import TMP_PREFIX, read_safetensors

pytestmark = pytest.mark.slow

# Every step saves; the model is wide enough (0.8M parameters, a 10 MB resume state) that a save lasts a while.
ARGS = [*TINY_TRAIN_ARGS, "--eval-interval", 1, "--eval-iters", 1, "--hidden-size", 128, "--n-layer", 4]
FOREVER = 10**6  # max-iters of the killed runs: they never end by themselves


def temp_files(out):
    return {name for name in os.listdir(out) if name.startswith(TMP_PREFIX)} if out.exists() else set()


def kill_during_a_save(command, out, rng, timeout=900):
    """Start the trainer and SIGKILL it while one of its saves is under way. Return the temporary files
    that were there before it started and those there after the kill."""
    stale = temp_files(out)
    saves_to_let_finish = rng.randint(0, 3)
    err = out.parent / "trainer.err"  # a file, not a pipe: a full pipe would stall the trainer
    with open(err, "wb") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=f)
    saves_seen, deadline = set(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            saving = temp_files(out) - stale
            if saving and (out / "resume.safetensors").exists():
                saves_seen |= saving
                if len(saves_seen) > saves_to_let_finish:
                    time.sleep(rng.uniform(0, 0.002))  # somewhere inside the write, the fsync or the rename
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the trainer ended before the kill:\n{err.read_text()[-3000:]}"
    return stale, temp_files(out)


def check_kills(corpus, out, rounds, seed=0):
    """At least `rounds` kills, and more (up to 5x) until one has landed inside a save: on a loaded machine
    the save can finish between seeing its temporary file and the kill."""
    rng, last_model, last_state, leftovers = random.Random(seed), -1, -1, []
    for k in range(5 * rounds):
        if k >= rounds and any(leftovers):
            break
        resume = ["--resume"] if k else []
        stale, left = kill_during_a_save(
            trainer_command("--data", corpus, "--out", out, *ARGS, "--max-iters", FOREVER, *resume), out, rng
        )
        assert not stale & left, "the temporary files of the previous kill survived a restart"
        leftovers.append(len(left))
        _, _, meta = load_checkpoint(out)  # whole, whatever the moment of the kill
        _, state = read_safetensors(out / "resume.safetensors")
        assert meta["iter"] >= last_model and state["iter"] >= last_state  # the previous one or a newer one
        assert meta["iter"] <= state["iter"] + 1  # a step's checkpoint is saved just before its resume state
        last_model, last_state = meta["iter"], state["iter"]
    # one more start, run to its end: it clears the last kill's leftovers and resumes cleanly
    finish = subprocess.run(
        trainer_command("--data", corpus, "--out", out, *ARGS, "--max-iters", last_state + 2, "--resume"),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert temp_files(out) == set()
    print(
        f"\n{len(leftovers)} kills during saves: temporary files left by {sum(n > 0 for n in leftovers)} of them, all "
        f"removed by the next start; resume state reached iteration {last_state}"
    )
    assert any(leftovers), "no kill landed inside a save, so this test proved nothing"


def test_trainer_killed_during_saves_always_leaves_a_whole_checkpoint_and_the_next_start_cleans_up(corpus, tmp_path):
    check_kills(corpus, tmp_path / "run", rounds=3)


@pytest.mark.long
def test_trainer_killed_60_times_during_saves_always_leaves_a_whole_checkpoint(corpus, tmp_path):
    check_kills(corpus, tmp_path / "run", rounds=60, seed=1)
