"""Input that used to break or poison the server (issue 16): lone surrogates anywhere in a JSON body, wrong JSON
types, image parts, empty bodies -- each a 400 at the edge that names the field, with nothing run or stored --
and a session row written by an older version that no listing may fail on."""
from __future__ import annotations

import json
import sqlite3

import pytest

from orchestrator.sessions import SessionRegistry
from tests.helpers.serving import asgi_client, inproc_app, mock_config

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MODEL = "specfleet-demo"
LONE = "\ud800"  # valid JSON ("\ud800"), not valid Unicode


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


@pytest.fixture
def served(tmp_path):
    return inproc_app(mock_config(tmp_path, replicas=[{"mock": {"step_ms": 0}}]))


def _post_raw(c, path, body):  # json.dumps escapes the surrogate: exactly what a client sends on the wire
    return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, body, param", [
    (CHAT, chat(messages=[{"role": "user", "content": "a" + LONE}]), "messages.0.content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
     "messages.0.content.0.text"),
    (CHAT, chat(stop=["x", LONE]), "stop.1"),
    (CHAT, chat(model=LONE), "model"),
    (CHAT, chat(**{"unknown" + LONE: 1}), "unknown" + "\ufffd"),
    (COMPLETIONS, {"model": MODEL, "prompt": LONE, "max_tokens": 4}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["ok" + LONE], "max_tokens": 4}, "prompt.0"),
    ("/v1/sessions", {"role": "coder", "metadata": {"k": LONE}}, "metadata.k"),
    ("/v1/sessions", {"team": LONE}, "team"),
    ("/v1/sessions", {"metadata": {LONE: "v"}}, "metadata." + "\ufffd"),
])
async def test_a_lone_surrogate_is_a_400_and_nothing_is_stored(served, path, body, param):
    app, state, _ = served
    async with asgi_client(app) as c:
        r = await _post_raw(c, path, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_unicode" and "surrogate" in err["message"], err
        assert err["param"].encode("utf-8", "replace").decode() == param.encode("utf-8", "replace").decode()
        assert (await c.get("/v1/sessions")).json()["data"] == []  # nothing stored
        assert (await c.post(CHAT, json=chat())).status_code == 200  # and the server still serves
    assert state.in_flight == 0


async def test_a_surrogate_pair_is_text_not_an_error(served):
    async with asgi_client(served[0]) as c:
        r = await _post_raw(c, "/v1/sessions", {"metadata": {"emoji": "\U0001F600"}})  # sent as \ud83d\ude00
        assert r.status_code == 200, r.text
        assert r.json()["metadata"] == {"emoji": "\U0001F600"}


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 8.5), ("temperature", "0.5"), ("stream", "true"),
    ("seed", "1"), ("top_k", [1]), ("ignore_eos", 1),
])
async def test_wrong_json_types_are_refused_not_coerced(served, field, value):
    async with asgi_client(served[0]) as c:
        r = await c.post(CHAT, json=chat(**{field: value}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


async def test_json_integers_may_be_written_with_a_zero_fraction(served):
    async with asgi_client(served[0]) as c:  # JSON Schema's integer includes 8.0: the schema says integer
        r = await c.post(CHAT, json=chat(max_tokens=8.0))
        assert r.status_code == 200, r.text
        r = await c.post(COMPLETIONS, json={"model": MODEL, "prompt": [5.0, 6], "max_tokens": 2})
        assert r.status_code == 200, r.text


async def test_image_input_is_refused_by_name(served):
    async with asgi_client(served[0]) as c:
        r = await c.post(CHAT, json=chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]))
    err = r.json()["error"]
    assert r.status_code == 400 and "image input is not supported" in err["message"], r.text
    assert err["param"] == "messages.0.content"


@pytest.mark.parametrize("content, message", [
    (b"", "the request body is empty"), (b"[]", "the request body must be a JSON object"),
    (b'"text"', "the request body must be a JSON object"), (b"{", "malformed JSON"),
])
async def test_empty_or_non_object_body(served, content, message):
    async with asgi_client(served[0]) as c:
        for path in (CHAT, COMPLETIONS, "/v1/sessions"):
            r = await c.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith(message), r.text
            assert "None" not in r.json()["error"]["message"]


def _old_row(path: str, owner: str, sid: str, metadata_json: str, role: bytes | str = "coder") -> None:
    db = sqlite3.connect(path)
    db.execute("INSERT INTO sessions (id, owner, role, team, metadata, created, updated) "
               "VALUES (?, ?, CAST(? AS TEXT), ?, ?, ?, ?)",  # bytes stored as TEXT: not valid UTF-8
               (sid, owner, role, "t1", metadata_json, 1.0, 1.0))
    db.commit()
    db.close()


def test_rows_written_by_an_older_version_never_break_a_listing(tmp_path):
    """What 0.1 stored for `{"metadata": {"k": "\\ud800"}}` (the JSON text escapes it), plus bytes that are not
    UTF-8 and metadata that is not JSON: every read still answers, with U+FFFD where the text was broken."""
    path = str(tmp_path / "old.sqlite")
    reg = SessionRegistry(path)
    good = reg.create("o", "coder", "t1", {"k": "v"})
    _old_row(path, "o", "sess_surrogate", json.dumps({"k": LONE, LONE: 1}))
    _old_row(path, "o", "sess_bytes", "{}", role=b"cod\xffer")
    _old_row(path, "o", "sess_garbage", "{not json")
    reg.close()
    reg = SessionRegistry(path)  # reopened, as after a restart
    rows = {s["id"]: s for s in reg.list("o")}
    assert set(rows) == {good["id"], "sess_surrogate", "sess_bytes", "sess_garbage"}
    assert rows["sess_surrogate"]["metadata"] == {"k": "\ufffd", "\ufffd": 1}
    assert rows["sess_bytes"]["role"] == "cod\ufffder" and rows["sess_garbage"]["metadata"] == {}
    json.dumps(rows, ensure_ascii=False).encode("utf-8")  # what the HTTP response does: must not raise
    assert reg.get("o", "sess_surrogate")["metadata"]["k"] == "\ufffd"
    team = reg.team("o", "t1")
    assert team["sessions"] == 4 and "cod\ufffder" in team["by_role"]


async def test_an_old_bad_row_does_not_fail_the_http_listing(tmp_path):
    cfg = mock_config(tmp_path)
    app, state, _ = inproc_app(cfg)
    owner = state.keys.authenticate("Bearer key-a")
    _old_row(cfg.persistence.resolved_path(), owner, "sess_old", json.dumps({"k": LONE}))
    async with asgi_client(app) as c:
        r = await c.get("/v1/sessions")
        assert r.status_code == 200 and r.json()["data"][0]["metadata"] == {"k": "\ufffd"}, r.text
        assert (await c.get("/v1/sessions/sess_old")).status_code == 200
        assert (await c.get("/v1/teams/t1")).status_code == 200
