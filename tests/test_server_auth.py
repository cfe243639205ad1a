"""API key: every route but the probes needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import pytest

from server.auth import bearer_token
from tests.server_fixtures import CHEAP, live_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tiny_model):
    with live_server(tiny_model, api_key=KEY, **CHEAP) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


BODY = {"prompt": "x", "recipe": "t2i", "width": 32, "height": 32}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/generate"),
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic czNjcmV0LWtleQ==", KEY])
def test_protected_routes_need_the_key(http, method, path, header):
    headers = {"Authorization": header} if header else {}
    r = http.request(method, path, json=BODY if method == "POST" else None, headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"


def test_right_key_passes_and_probes_are_open(http):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert http.post("/generate", json=BODY, headers=auth).status_code == 200
    assert http.get("/v1/models", headers=auth).status_code == 200
    assert http.get("/metrics", headers={"authorization": f"bearer  {KEY}"}).status_code == 200
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200


def test_bearer_parsing():
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"Token abc")]) is None
    assert bearer_token([(b"x-other", b"Bearer abc")]) is None
