"""QUILL_QUANTIZE: int8 linear weights (model/quantize.py) in every GPT's engine, in a thread or a child process;
a value other than none or int8 stops the settings from loading, naming the allowed ones."""

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_helpers import app_command, running_server

from app.main import create_app
from app.settings import Settings
from model.quantize import Int8Linear


def test_a_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QUILL_QUANTIZE", "int4")
    with pytest.raises(ValidationError, match="quantize") as e:
        Settings(_env_file=None)
    assert "'none' or 'int8'" in str(e.value)
    monkeypatch.setenv("QUILL_QUANTIZE", "int8")
    assert Settings(_env_file=None).quantize == "int8"
    monkeypatch.delenv("QUILL_QUANTIZE")
    assert Settings(_env_file=None).quantize is None  # off by default


def test_an_engine_in_a_thread_serves_int8_weights(checkpoints):
    names = ("tiny-gpt", "tiny-lstm")
    settings = Settings(_env_file=None, checkpoints=[str(checkpoints[n]) for n in names], quantize="int8")
    plain = Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])])
    with TestClient(create_app(plain)) as client:
        card = client.get("/v1/models/tiny-gpt").json()
    assert card["quantization"] is None
    with TestClient(create_app(settings)) as client:
        served = client.app.state.service.get("tiny-gpt")
        assert isinstance(served.model.blocks[0].attn.qkv, Int8Linear)  # the engine's model is the card's here
        int8_card = client.get("/v1/models/tiny-gpt").json()
        assert int8_card["parameters"] == card["parameters"]
        assert (int8_card["quantization"], int8_card["dtype"]) == ("int8", "float32")  # activations stay float32
        assert client.get("/v1/models/tiny-lstm").json()["quantization"] is None
        for name in names:  # the LSTM is served as it is
            body = {"model": name, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8


@pytest.mark.slow
def test_a_server_started_with_int8_serves(checkpoints, tmp_path):
    """As a user starts it: the engine in a child process, which quantizes the weights it loads."""
    env = {"QUILL_QUANTIZE": "int8", "QUILL_COMPILE": "0"}
    log = tmp_path / "server.log"
    with running_server(app_command([checkpoints["tiny-gpt"]]), env, log) as server:
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(server.url + "/v1/models/tiny-gpt").json()["quantization"] == "int8"  # the card says it
    assert "linear weights int8" in log.read_text()
