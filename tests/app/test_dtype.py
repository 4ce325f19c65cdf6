"""QUILL_DTYPE: the weights cast once at load, every model and path serving in that precision."""

import math

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.device import pick_dtype


def test_auto_is_float32_on_a_cpu_and_a_name_is_its_dtype():
    assert pick_dtype("auto", "cpu") is torch.float32
    assert pick_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        pick_dtype("int8", "cpu")


def test_every_model_serves_in_bfloat16_when_asked(checkpoints):
    names = ("tiny-gpt", "tiny-lstm", "bpe-gpt")
    settings = Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in names], dtype="bfloat16")
    with TestClient(create_app(settings)) as client:
        for name in names:
            assert client.get(f"/v1/models/{name}").json()["dtype"] == "bfloat16"
            served = client.app.state.service.get(name)
            assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16}
            body = {"model": name, "prompt": "Hello", "max_tokens": 12, "temperature": 0, "logprobs": 2}
            r = client.post("/v1/completions", json={**body, "echo": True})
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            assert r.json()["usage"]["completion_tokens"] == 12
            assert all(math.isfinite(x) and x <= 0 for x in lp["token_logprobs"][1:])
            sampled = client.post("/generate", json={"model": name, "prompt": "Hello", "max_new_tokens": 12}).text
            assert sampled.count("event: token") == 12


def test_the_default_serves_float32_here(checkpoints):
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])]))) as client:
        assert client.get("/v1/models/tiny-gpt").json()["dtype"] == "float32"


def test_a_large_model_gets_every_core_and_a_small_one_leaves_one_to_the_server(monkeypatch, checkpoints):
    from app.registry import ALL_CORES_FROM, engine_threads, load_served_model
    from model import GPT

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    small, large = GPT(40, 16, 32, 1, 2, 0.0), GPT(40, 16, 384, 3, 2, 0.0)
    assert sum(p.numel() for p in small.parameters()) < ALL_CORES_FROM <= sum(p.numel() for p in large.parameters())
    assert (engine_threads(small), engine_threads(large)) == (3, 4)
    weights = checkpoints["tiny-gpt"] / "model.safetensors"
    served = load_served_model(weights, "cpu", 2, None)
    assert served.engine.threads == 3  # a tiny model: the default leaves a core to the server
    assert load_served_model(weights, "cpu", 2, None, threads=2).engine.threads == 2
