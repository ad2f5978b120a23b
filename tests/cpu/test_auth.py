"""API keys: 401 without a valid Bearer key, health open, constant-time compare, keys never logged."""
from __future__ import annotations

import logging

import pytest

from orchestrator.api.auth import KeyRing, fingerprint
from orchestrator.api.errors import APIError
from tests.helpers.serving import asgi_client, inproc_app, mock_config

BODY = {"model": "specfleet-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_keyring_unit():
    ring = KeyRing(["alpha", "beta"])
    assert ring.authenticate("Bearer beta") == fingerprint("beta") != fingerprint("alpha")
    assert "alpha" not in repr(ring) and "alpha" not in fingerprint("alpha")
    for bad in (None, "", "Bearer", "Basic alpha", "Bearer alph", "Bearer alpha2", "alpha"):
        with pytest.raises(APIError) as e:
            ring.authenticate(bad)
        assert e.value.status == 401
    assert KeyRing([]).authenticate(None) == "anonymous"  # no keys configured: auth off


@pytest.fixture
def app(tmp_path):
    return inproc_app(mock_config(tmp_path))[0]


@pytest.mark.parametrize("path, method", [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                                          ("/v1/models", "get"), ("/v1/sessions", "get"), ("/v1/sessions", "post"),
                                          ("/v1/sessions/x", "get"), ("/v1/sessions/x", "delete"),
                                          ("/v1/teams/t", "get")])
async def test_every_api_endpoint_needs_a_key(app, path, method):
    async with asgi_client(app, key=None) as c:
        r = await getattr(c, method)(path, **({"json": BODY} if method == "post" else {}))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    async with asgi_client(app, key="wrong") as c:
        r = await getattr(c, method)(path, **({"json": BODY} if method == "post" else {}))
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"


async def test_health_and_metrics_are_open(app):
    async with asgi_client(app, key=None) as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_keys_never_appear_in_logs_or_responses(app, caplog):
    caplog.set_level(logging.DEBUG)
    async with asgi_client(app, key="key-a") as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        s = await c.post("/v1/sessions", json={"role": "coder"})
    async with asgi_client(app, key="key-a-but-wrong") as c:
        await c.post("/v1/chat/completions", json=BODY)
    text = caplog.text + r.text + s.text + str(dict(r.headers))
    assert "key-a" not in text and r.status_code == 200
