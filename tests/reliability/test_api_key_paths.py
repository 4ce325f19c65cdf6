"""The API key guards by default: any path or method that is not exactly an open route is refused, even
paths that do not exist (so a scan without the key learns nothing, not even which routes there are)."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.middleware import OPEN_PATHS
from app.settings import Settings

KEY = "s3cret"
NEAR_MISSES = [
    "/health/",
    "/HEALTH",
    "/ready/x",
    "/healthz",
    "/health/../metrics",
    "/ready%00",
    "/v1/models/",
    "/v1//models",
    "/nope",
    "/docs",
    "/openapi.json",
    "/redoc",
]
WRONG_KEYS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    f"Bearer {KEY} ",
    f"Bearer {KEY[:-1]}",
    f"Bearer {KEY}x",
    KEY,
    f"Basic {KEY}",
    "Bearer " + "x" * 10_000,
]


@pytest.fixture(scope="module")
def client(checkpoints):
    app = create_app(Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], api_key=KEY))
    with TestClient(app) as c:
        yield c


def test_api_key_open_paths_are_health_ready_and_pages_outside_the_api_schema(client):
    api_paths = set(client.app.openapi()["paths"])
    assert {"/health", "/ready"} <= OPEN_PATHS
    assert OPEN_PATHS & api_paths == {"/health", "/ready"}


@pytest.mark.parametrize("path", NEAR_MISSES)
@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT", "DELETE"])
def test_api_key_refuses_a_path_that_is_not_exactly_an_open_one(client, path, method):
    r = client.request(method, path)
    assert r.status_code == 401, (method, path, r.status_code)


@pytest.mark.parametrize("authorization", WRONG_KEYS)
def test_api_key_refuses_every_wrong_form_of_the_key(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert KEY not in r.text
