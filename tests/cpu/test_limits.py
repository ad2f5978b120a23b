"""Every request limit answers with an OpenAI-style error body and the designed status (in-process app)."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.helpers.serving import asgi_client, inproc_app, mock_config

CHAT = "/v1/chat/completions"


def chat(**kw):
    body = {"model": "specfleet-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    body.update(kw)
    return body


@pytest.fixture
def app(tmp_path):
    cfg = mock_config(tmp_path, limits={"max_body_bytes": 4096, "max_tokens": 100, "max_stop": 2,
                                        "per_key_concurrency": 1, "per_key_queue": 0},
                      replicas=[{"mock": {"max_model_len": 512, "kv_total_tokens": 600, "step_ms": 1}}])
    return inproc_app(cfg)[0]


def _err(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body, status, code, param", [
    (chat(model="nope"), 404, "model_not_found", "model"),
    (chat(n=2), 400, "invalid_value", "n"),
    (chat(temperature=2.5), 400, "invalid_value", "temperature"),
    (chat(temperature=-0.1), 400, "invalid_value", "temperature"),
    (chat(top_p=0), 400, "invalid_value", "top_p"),
    (chat(top_p=1.5), 400, "invalid_value", "top_p"),
    (chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (chat(max_tokens=101), 400, "max_tokens_exceeded", "max_tokens"),
    (chat(max_tokens=100, messages=[{"role": "user", "content": "x" * 450}]), 400, "context_length_exceeded", None),
    (chat(stop=["a", "b", "c"]), 400, "too_many_stop_sequences", "stop"),
    (chat(stop=[""]), 400, "invalid_stop", "stop"),
    (chat(messages=[]), 400, "invalid_value", "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, None, None),
    (chat(frobnicate=1), 400, "unknown_parameter", "frobnicate"),
    (chat(tools=[{"type": "function"}]), 400, "missing_parameter", "tools.0.function"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "missing_parameter", "model"),
])
async def test_bad_chat_requests(app, body, status, code, param):
    async with asgi_client(app) as c:
        _err(await c.post(CHAT, json=body), status, code, param)


async def test_malformed_json_and_wrong_types(app):
    async with asgi_client(app) as c:
        _err(await c.post(CHAT, content=b'{"model": ', headers={"content-type": "application/json"}), 400,
             "invalid_json")
        _err(await c.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
        _err(await c.post(CHAT, json=chat(max_tokens="many")), 400, param="max_tokens")


async def test_body_size_413_by_length_and_by_stream(app):
    async with asgi_client(app) as c:
        _err(await c.post(CHAT, json=chat(messages=[{"role": "user", "content": "x" * 5000}])), 413,
             "request_too_large")

        async def chunks():  # no Content-Length: counted while it streams in
            for _ in range(10):
                yield b"x" * 1000

        _err(await c.post(CHAT, content=chunks()), 413, "request_too_large")


async def test_completion_prompt_forms(app):
    async with asgi_client(app) as c:
        ok = await c.post("/v1/completions", json={"model": "specfleet-demo", "prompt": [72, 105], "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 2
        _err(await c.post("/v1/completions", json={"model": "specfleet-demo", "prompt": [10**9]}), 400,
             "invalid_prompt")
        _err(await c.post("/v1/completions", json={"model": "specfleet-demo", "prompt": ["a", "b"]}), 400,
             "invalid_prompt")
        _err(await c.post("/v1/completions", json={"model": "specfleet-demo", "prompt": ""}), 400, "empty_prompt")


async def test_per_key_concurrency_429_with_retry_after(app):
    async with asgi_client(app) as a, asgi_client(app, "key-b") as b:
        slow = asyncio.create_task(a.post(CHAT, json=chat(max_tokens=100)))
        await asyncio.sleep(0.05)
        r = await a.post(CHAT, json=chat())
        err = _err(r, 429, "rate_limit_exceeded")
        assert r.headers["retry-after"] == "1" and "concurrent" in err["message"]
        assert (await b.post(CHAT, json=chat())).status_code == 200  # another key is not limited
        assert (await slow).status_code == 200
        assert (await a.post(CHAT, json=chat())).status_code == 200  # the slot was released


async def test_engine_no_capacity_is_429(tmp_path):
    cfg = mock_config(tmp_path, replicas=[{"mock": {"kv_total_tokens": 120, "max_model_len": 512, "step_ms": 2}}])
    app = inproc_app(cfg)[0]
    async with asgi_client(app) as a, asgi_client(app, "key-b") as b:
        first = asyncio.create_task(a.post(CHAT, json=chat(max_tokens=90)))
        await asyncio.sleep(0.05)
        r = await b.post(CHAT, json=chat(max_tokens=90))
        err = _err(r, 429, "no_capacity")
        assert "KV cache full" in err["message"] and int(r.headers["retry-after"]) >= 1
        assert (await first).status_code == 200


async def test_mid_stream_engine_failure_ends_stream_with_error_event(tmp_path):
    cfg = mock_config(tmp_path, replicas=[{"mock": {"fail_after_tokens": 20, "step_ms": 0}}])
    app, state, _ = inproc_app(cfg)
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json=chat(max_tokens=50, stream=True))
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "engine_error" and "[DONE]" not in events
        # a non-streamed request on a failing engine is a 503 with Retry-After, not a hang or a 500
        r = await c.post(CHAT, json=chat(max_tokens=50))
        assert r.status_code == 503 and "retry-after" in r.headers
        assert state.in_flight == 0 and state.gate.waiting == 0


async def test_draining_server_refuses_new_work_with_503(app):
    app.state.specfleet.draining = True
    async with asgi_client(app) as c:
        _err(await c.post(CHAT, json=chat()), 503, "shutting_down")
        assert (await c.get("/health")).status_code == 503
