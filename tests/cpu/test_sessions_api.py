"""Session endpoints (in-process app): lifecycle, turns with x-session-id, ownership 404s, teams."""
from __future__ import annotations

from tests.helpers.serving import asgi_client, inproc_app, mock_config

CHAT = "/v1/chat/completions"


def chat(max_tokens=16):
    return {"model": "specfleet-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


async def test_session_lifecycle_and_ownership(tmp_path):
    app = inproc_app(mock_config(tmp_path, replicas=[{"count": 2, "mock": {"step_ms": 0}}]))[0]
    async with asgi_client(app, "key-a") as a, asgi_client(app, "key-b") as b:
        r = await a.post("/v1/sessions", json={"role": "coder", "team": "t1", "metadata": {"agent": "c1"}})
        assert r.status_code == 200
        sid = r.json()["id"]
        for _ in range(3):
            r = await a.post(CHAT, json=chat(), headers={"x-session-id": sid})
            assert r.status_code == 200 and r.headers["x-session-id"] == sid
            assert r.headers["x-specfleet-replica"] in ("r0", "r1") and r.headers["x-specfleet-route"]
        s = (await a.get(f"/v1/sessions/{sid}")).json()
        assert s["turns"] == 3 and s["completion_tokens"] == 48 and s["role"] == "coder"
        assert len(s["replica_history"]) == 3 and set(s["acceptance_by_replica"]) == {"r0", "r1"}
        assert s["tau"] > 1 and s["spec"] == {"enabled": True, "block_size": 16}
        # a turn that forces speculation off is visible in the session's spec decision
        r = await a.post(CHAT, json={**chat(), "spec": {"enabled": False}}, headers={"x-session-id": sid})
        assert r.headers["x-specfleet-spec"] == "off"
        assert (await a.get(f"/v1/sessions/{sid}")).json()["spec"]["enabled"] is False

        # another key: the session does not exist for it (get, delete, turn, list, team)
        for resp in (await b.get(f"/v1/sessions/{sid}"), await b.delete(f"/v1/sessions/{sid}"),
                     await b.post(CHAT, json=chat(), headers={"x-session-id": sid}), await b.get("/v1/teams/t1")):
            assert resp.status_code == 404, resp.text
        assert (await b.get("/v1/sessions")).json()["data"] == []

        other = (await a.post("/v1/sessions", json={"role": "reviewer", "team": "t1"})).json()["id"]
        await a.post("/v1/sessions", json={"role": "coder", "team": "t2"})
        listed = (await a.get("/v1/sessions", params={"team": "t1"})).json()["data"]
        assert [x["id"] for x in listed] == [sid, other]
        team = (await a.get("/v1/teams/t1")).json()
        assert team["sessions"] == 2 and team["turns"] == 4 and set(team["by_role"]) == {"coder", "reviewer"}

        assert (await a.delete(f"/v1/sessions/{sid}")).json()["deleted"] is True
        assert (await a.get(f"/v1/sessions/{sid}")).status_code == 404
        r = await a.post(CHAT, json=chat(), headers={"x-session-id": sid})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


async def test_session_input_validation(tmp_path):
    app = inproc_app(mock_config(tmp_path, limits={"max_sessions_per_key": 2}))[0]
    async with asgi_client(app) as a:
        assert (await a.post("/v1/sessions", json={"role": "x" * 200})).status_code == 400
        assert (await a.post("/v1/sessions", json={"metadata": {"k": [1, 2]}})).status_code == 400
        assert (await a.post("/v1/sessions", json={"owner": "someone"})).status_code == 400
        assert (await a.post("/v1/sessions", json={})).status_code == 200
        assert (await a.post("/v1/sessions", json={})).status_code == 200
        r = await a.post("/v1/sessions", json={})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
        assert (await a.get("/v1/sessions/does-not-exist")).status_code == 404
