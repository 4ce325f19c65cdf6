"""The playground's page and assets as HTTP resources (in-process; the browser test drives the page)."""

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.protocol import GenerateRequest
from app.routes_playground import ASSETS
from app.settings import Settings


@pytest.fixture(scope="module")
def client(checkpoints):
    settings = Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], api_key="s3cret")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("path", ASSETS)
def test_playground_asset_is_served_without_an_api_key_with_its_type_and_a_strict_policy(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == ASSETS[path][1]
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_playground_page_loads_nothing_from_elsewhere(client):
    page = client.get("/").text
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert "/static/playground.js" in links and "/static/playground.css" in links
    assert all(link.startswith("/") or link.startswith("data:") for link in links), links


def test_playground_page_links_only_assets_that_are_served(client):
    page = client.get("/").text
    for link in re.findall(r'(?:src|href)="(/static/[^"]*)"', page):
        assert link in ASSETS


def test_every_number_input_of_the_page_is_a_generate_field_that_the_script_sends(client):
    inputs = re.findall(r'<input id="(\w+)" type="number"', client.get("/").text)
    (sent,) = re.findall(r"for \(const id of \[([^\]]*)\]\) numberField", client.get("/static/playground.js").text)
    assert {"min_p", "repetition_penalty", "top_k", "top_p"} <= set(inputs)
    assert set(inputs) <= set(GenerateRequest.model_fields)
    assert sorted(re.findall(r'"(\w+)"', sent)) == sorted(inputs)


@pytest.mark.parametrize("path", ["/static/", "/static/index.html", "/static/../main.py", "/playground.js"])
def test_other_paths_near_the_playground_are_not_served(client, path):
    r = client.get(path, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] is None


def test_the_api_behind_the_page_still_needs_the_key(client):
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_api_docs_page_loads_nothing_from_elsewhere_and_what_it_loads_is_served(client):
    key = {"Authorization": "Bearer s3cret"}  # like the API it describes, it needs the key when there is one
    page = client.get("/docs", headers=key).text
    links = re.findall(r"""(?:src|href|url)[=:]\s*["']([^"']*)["']""", page)
    assert any(link.endswith(".js") for link in links), links
    assert all(link.startswith("/") for link in links), links
    assert '"validatorUrl": null' in page  # else Swagger UI asks validator.swagger.io from any host but localhost
    for link in links:
        assert client.get(link, headers=key).status_code == 200, link


def test_redoc_is_not_served_as_its_page_would_load_a_logo_from_elsewhere(client):
    assert client.get("/redoc", headers={"Authorization": "Bearer s3cret"}).status_code == 404
