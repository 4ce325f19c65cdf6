"""The trainer on a full disk or a read-only output directory: one clear line, a non-zero exit, and the
checkpoints already there untouched. Real failures, not mocks: a small tmpfs filled up, and a read-only
bind mount (chmod does not stop root); both need mount, so they skip where it is not allowed."""

import contextlib
import hashlib
import os
import subprocess

import pytest
from helpers import REPO, TINY_TRAIN_ARGS, trainer_command, trainer_env

from model import load_checkpoint
from model.checkpoint import TMP_PREFIX
from train.config import parse_config
from train.loop import train

pytestmark = pytest.mark.slow


def mount(*args):
    proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}); needs root")


@contextlib.contextmanager
def small_disk(path, size="2m"):
    path.mkdir()
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@contextlib.contextmanager
def read_only(path):
    mount("--bind", path, path)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def fill_up(directory, leave=32 * 1024):
    """Fill the file system of `directory`, then give back `leave` bytes: enough for log lines, not a save."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def snapshot(run):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.suffix == ".safetensors"}


def first_run(corpus, out):
    train(
        parse_config(
            ["--data", str(corpus), "--out", str(out), *TINY_TRAIN_ARGS, "--max-iters", "4", "--eval-interval", "2"]
        )
    )
    return snapshot(out)


def resume(corpus, out):
    args = ["--data", corpus, "--out", out, *TINY_TRAIN_ARGS, "--max-iters", 12, "--eval-interval", 2, "--resume"]
    return subprocess.run(
        trainer_command(*args), cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=900
    )


def assert_refused_clearly(proc, reason, out, before):
    assert proc.returncode != 0
    assert reason in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert snapshot(out) == before  # the previous checkpoint and resume state, byte for byte
    assert not [p for p in os.listdir(out) if p.startswith(TMP_PREFIX)]
    load_checkpoint(out)


def test_disk_full_during_a_save_exits_non_zero_with_a_clear_error_and_keeps_the_previous_checkpoint(corpus, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        out = disk / "run"
        before = first_run(corpus, out)
        fill_up(disk)
        proc = resume(corpus, out)
        assert_refused_clearly(proc, "No space left on device", out, before)


def test_read_only_output_directory_exits_non_zero_with_a_clear_error_and_keeps_the_previous_checkpoint(
    corpus, tmp_path
):
    out = tmp_path / "run"
    before = first_run(corpus, out)
    with read_only(out):
        proc = resume(corpus, out)
        assert_refused_clearly(proc, "Read-only file system", out, before)
