"""With the engine in a child process (the default), the server's process holds no weights: it describes each model
from its checkpoint's header (a model on the meta device), and the model card says the same as with the weights."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import REPO, free_port

from app.main import create_app
from app.registry import load_served_model
from app.routes_openai import describe
from app.settings import Settings
from model import CheckpointError, load_checkpoint
from model.checkpoint import write_safetensors

NAMES = ("tiny-gpt", "tiny-lstm", "bpe-gpt")


def served(checkpoints, name, process, dtype=torch.float32):
    return load_served_model(checkpoints[name] / "model.safetensors", "cpu", 2, None, dtype=dtype, process=process)


@pytest.mark.parametrize("name", NAMES)
def test_the_server_process_holds_no_weights_when_the_engine_has_a_process_of_its_own(checkpoints, name):
    model = served(checkpoints, name, process=True).model
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_model_card_is_the_same_whether_the_engine_holds_the_weights_in_a_thread_or_a_process(checkpoints, name, dtype):
    described, loaded = served(checkpoints, name, True, dtype), served(checkpoints, name, False, dtype)
    assert describe(described) == describe(loaded)
    card = describe(described)
    real = load_checkpoint(checkpoints[name])[0]
    assert card["parameters"] == sum(p.numel() for p in real.parameters())
    assert card["dtype"] == str(dtype).removeprefix("torch.")
    assert card["model_type"] == ("lstm" if name == "tiny-lstm" else "gpt")


@pytest.mark.slow
def test_a_server_with_process_engines_describes_each_model_and_serves_it(checkpoints):
    paths = [str(checkpoints[n]) for n in ("tiny-gpt", "tiny-lstm")]
    settings = Settings(_env_file=None, checkpoints=paths, engine_process=True, dtype="bfloat16")
    with TestClient(create_app(settings)) as client:
        for name in ("tiny-gpt", "tiny-lstm"):
            card = client.get(f"/v1/models/{name}").json()
            assert card["dtype"] == "bfloat16"
            assert card["parameters"] == sum(p.numel() for p in load_checkpoint(checkpoints[name])[0].parameters())
            model = client.app.state.service.get(name).model
            assert {p.device.type for p in model.parameters()} == {"meta"}
            r = client.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # the child has the weights


def mismatched_checkpoint(checkpoints, folder):
    """tiny-gpt's config and tokenizer over the tensors of a GPT twice as wide."""
    real, tokenizer, meta = load_checkpoint(checkpoints["tiny-gpt"])
    wide = type(real)(**{**dataclasses.asdict(real.config), "hidden_size": 64})
    path = folder / "mismatched" / "model.safetensors"
    write_safetensors(path, {k: v for k, v in wide.state_dict().items() if k != "lm_head.weight"}, meta)
    return path


def test_a_checkpoint_whose_shapes_disagree_with_its_config_is_refused_before_the_engine_starts(checkpoints, tmp_path):
    path = mismatched_checkpoint(checkpoints, tmp_path)
    with pytest.raises(CheckpointError, match="weights do not match the config") as refused:
        load_served_model(path, "cpu", 2, None, process=True)
    assert str(path) in str(refused.value) and "size mismatch for tok_emb.weight" in str(refused.value)


@pytest.mark.slow
def test_python_m_app_refuses_a_checkpoint_whose_shapes_disagree_naming_it_and_why(checkpoints, tmp_path):
    path = mismatched_checkpoint(checkpoints, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QUILL_ENGINE_PROCESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "app", "--checkpoint", str(path.parent), "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stderr and "weights do not match the config" in proc.stderr


# Builds the served model of a checkpoint in a fresh process, its engine in a child process of its own (not started
# here), and prints the weights' MiB and how much this process's resident memory grew, at most and at the end.
SERVER_RSS = """
import json, sys
from app.registry import load_served_model
def status(key):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here: torch's import is not in it
before = status("VmRSS")
served = load_served_model(sys.argv[1], "cpu", 2, None, process=True)
weights = sum(p.numel() * p.element_size() for p in served.model.parameters()) / 2**20
print(json.dumps({"weights": weights, "grew": status("VmRSS") - before, "peak": status("VmHWM") - before}))
"""


@pytest.mark.slow
def test_the_server_process_stays_far_smaller_than_a_large_checkpoints_weights(tmp_path):
    make = (
        "import sys, torch; from model import GPT, ByteTokenizer, save_checkpoint; torch.manual_seed(0); "
        "save_checkpoint(sys.argv[1], GPT(256, 64, 512, 8, 8, 0.0), ByteTokenizer(), {})"
    )  # about 100 MB of float32 weights, made in a subprocess so that this one stays as small
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    weights = tmp_path / "large.safetensors"
    subprocess.run([sys.executable, "-c", make, str(weights)], cwd=REPO, env=env, check=True, timeout=300)
    out = subprocess.run(
        [sys.executable, "-c", SERVER_RSS, str(weights)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert 90 < seen["weights"] < 110
    # a full copy was loaded here only to describe the model before (measured: +102 MiB, peak +199, for 97)
    assert seen["grew"] < 0.25 * seen["weights"] and seen["peak"] < 0.25 * seen["weights"], seen
