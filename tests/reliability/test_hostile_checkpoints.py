"""Hostile checkpoint files handed to the server and to the trainer's --resume: each is refused with a
clear error, and a pickle payload never runs (it would create a marker file if it did)."""

import json
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from helpers import TINY_TRAIN_ARGS, tiny_gpt, trainer_env
from service_helpers import REPO, free_port

from app.metrics import Metrics
from app.serving import Service
from app.settings import Settings
from model import CharTokenizer, CheckpointError, save_checkpoint
from train.config import parse_config
from train.loop import train


class WritesMarker:
    """Unpickling this creates the marker file: the proof that a payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(path, marker):
    path.write_bytes(pickle.dumps({"weights": WritesMarker(marker)}))


def torch_save_payload(path, marker):
    torch.save({"state": torch.zeros(3), "x": WritesMarker(marker)}, path)


def truncated(path, marker):
    save_checkpoint(path, tiny_gpt(30), CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n"), {})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def huge_header(path, marker):
    path.write_bytes(struct.pack("<Q", 1 << 60) + b'{"__metadata__": {}}')


def huge_tensor(path, marker):
    """A well-formed header whose one tensor claims a terabyte that the file does not hold."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


HOSTILE = {
    "pickle payload": (pickle_payload, "pickle"),
    "torch.save payload": (torch_save_payload, "pickle"),
    "truncated": (truncated, "truncated|corrupted"),
    "header claims a huge size": (huge_header, "header claims"),
    "tensor claims a terabyte": (huge_tensor, "corrupted"),
}
CASES = pytest.mark.parametrize("make, reason", HOSTILE.values(), ids=list(HOSTILE))


@CASES
def test_server_refuses_a_hostile_checkpoint_at_load_with_a_clear_error(tmp_path, make, reason):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    make(run / "model.safetensors", marker)
    service = Service(Settings(_env_file=None, checkpoints=[str(run)]), Metrics())
    with pytest.raises(CheckpointError, match=reason):
        service.load()
    assert not marker.exists()


@CASES
def test_trainer_refuses_to_resume_from_a_hostile_resume_file_with_a_clear_error(corpus, tmp_path, make, reason):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    make(run / "resume.safetensors", marker)
    cfg = parse_config(["--data", str(corpus), "--out", str(run), *TINY_TRAIN_ARGS, "--max-iters", "2", "--resume"])
    with pytest.raises(SystemExit, match=f"cannot resume: .*({reason})"):
        train(cfg)
    assert not marker.exists()


@pytest.mark.slow
def test_python_m_app_given_a_pickle_payload_exits_non_zero_naming_it_and_never_runs_it(tmp_path):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    pickle_payload(run / "model.safetensors", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "app", "--checkpoint", str(run), "--port", str(free_port())],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode != 0
    assert "not safetensors; refused (it was not unpickled)" in proc.stderr
    assert not marker.exists()
