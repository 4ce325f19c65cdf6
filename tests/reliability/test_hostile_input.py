"""Hostile requests beyond tests/app/test_api.py's bad parameters: huge prompts, bad bytes, lone
surrogates in every string field, header floods, and numbers at the edges of what floats can hold.
Each gets its 4xx in the one error shape (never a 5xx), and the next request is served."""

import json
import socket
import time

import pytest
import torch
from fastapi.testclient import TestClient
from load_helpers import real_server
from service_helpers import app_command

from app.main import create_app
from app.protocol import MAX_SEED
from app.settings import Settings
from model.sampling import SamplingParams, sample_next_token

MB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


def settings(checkpoints, **overrides):
    return Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], **overrides)


@pytest.fixture(scope="module")
def client(checkpoints):
    with TestClient(create_app(settings(checkpoints))) as c:
        yield c


def assert_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] in (None, "model_not_found") and body["error"]["message"]
    return body["error"]


def assert_still_serving(client):
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3, "stream": False})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_prompt_of_1_mb_gets_413_under_the_default_body_limit(client):
    assert_error(client.post("/generate", json={"prompt": "a" * MB}), 413)
    assert_still_serving(client)


def test_prompt_of_1_mb_sent_chunked_gets_413_under_the_default_body_limit(client):
    def chunks():  # no Content-Length to refuse it by
        yield b'{"prompt": "'
        for _ in range(MB // 65536):
            yield b"a" * 65536
        yield b'"}'

    assert_error(client.post("/generate", content=chunks(), headers=JSON), 413)
    assert_still_serving(client)


def test_prompt_of_1_mb_within_a_raised_body_limit_gets_422_naming_the_prompt(checkpoints):
    with TestClient(create_app(settings(checkpoints, max_body_bytes=2 * MB))) as c:
        assert assert_error(c.post("/generate", json={"prompt": "a" * MB}), 422)["param"] == "prompt"
        assert_still_serving(c)


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "\xff\xfe"}', b"\xff", b'{"prompt": "caf\xc3"}'],
    ids=["invalid bytes", "one byte", "cut character"],
)
def test_body_that_is_not_utf8_gets_400(client, body):
    assert_error(client.post("/generate", content=body, headers=JSON), 400)
    assert_still_serving(client)


LONE_SURROGATES = [
    ("/generate", '{"prompt": "Hi", "stop": ["\\udc00"]}'),
    ("/generate", '{"prompt": "Hi", "model": "\\ud800"}'),
    ("/generate", '{"prompt": "Hi", "\\ud800": 1}'),
    ("/generate", '{"prompt": "\\udfff\\ud800"}'),
    ("/v1/completions", '{"prompt": "Hi", "stop": "\\ud800"}'),
    ("/v1/completions", '{"prompt": "Hi", "stream_options": {"\\ud800": true}}'),
    ("/v1/completions", '{"prompt": "\\ud800"}'),
]


@pytest.mark.parametrize("route, body", LONE_SURROGATES, ids=[b for _, b in LONE_SURROGATES])
def test_lone_surrogate_in_any_string_field_gets_a_4xx_in_the_error_shape(client, route, body):
    r = client.post(route, content=body, headers=JSON)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
    assert_still_serving(client)


@pytest.mark.parametrize(
    "route, body",
    [
        ("/generate", {"prompt": "Hi", "max_new_tokens": 4.0, "top_k": 5.0, "seed": 7.0, "stream": False}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4.0, "seed": 7.0}),
    ],
    ids=["generate", "completions"],
)
def test_whole_numbers_written_as_floats_are_integers_as_the_schema_says(client, route, body):
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_seed_beyond_what_every_json_client_reads_exactly_gets_422(client):
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "seed": MAX_SEED + 1})
    assert assert_error(r, 422)["param"] == "seed"


def test_seed_chosen_by_the_server_survives_a_javascript_number(client):
    seeds = [
        client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1, "stream": False}).json()["seed"]
        for _ in range(20)
    ]
    assert all(0 <= s <= 2**53 - 1 for s in seeds)  # JSON.parse in a browser returns them unchanged


def test_top_p_too_small_for_float32_keeps_the_best_token_instead_of_failing_the_batch():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_next_token(logits, SamplingParams(temperature=1.0, top_p=5e-324)) == 1


def test_top_p_too_small_for_float32_is_served_as_greedy(client):
    body = {"prompt": "Hello", "max_new_tokens": 20, "stream": False}
    greedy = client.post("/generate", json={**body, "temperature": 0}).json()["text"]
    r = client.post("/generate", json={**body, "top_p": 5e-324, "seed": 3})
    assert r.status_code == 200 and r.json()["text"] == greedy


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with real_server(app_command([checkpoints["tiny-gpt"]]), None, log) as s:
        yield s


def raw_request(port, head, pause_every=None):
    """Send a request head over a socket, in pieces of `pause_every` bytes if given; return the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        step = pause_every or len(head)
        for i in range(0, len(head), step):
            sock.sendall(head[i : i + step])
            if pause_every:
                time.sleep(0.01)  # the server sees an incomplete head, piece by piece
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get_with_headers(headers):
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"GET /v1/models HTTP/1.0\r\nHost: quill\r\n{lines}\r\n".encode()  # 1.0: the body ends at close


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize(
    "headers, pieces",
    [
        ([(f"x-h-{i}", "v") for i in range(1000)], None),
        ([("x-big", "a" * 100_000)], None),
        ([("x-big", "a" * 100_000)], 4096),
    ],
    ids=["1000 headers", "one 100 KB header", "one 100 KB header, trickled"],
)
def test_header_flood_gets_431_in_the_error_shape_over_the_network(server, headers, pieces):
    status, body = raw_request(server.port, get_with_headers(headers), pieces)
    assert status == 431
    error = json.loads(body)["error"]
    assert error["code"] is None and "header" in error["message"]
    assert raw_request(server.port, get_with_headers([]))[0] == 200
