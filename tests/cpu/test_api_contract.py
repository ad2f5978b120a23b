"""The published OpenAPI schema says what the server does (issue 16, "the API contract"), and the HTTP edge:
documented statuses with the error body, unsupported knobs constrained, the prompt and messages as accepted,
/metrics as text, a 405's Allow header, every response counted, one x-request-id, non-UTF-8 headers, the queue
timeout. In-process app over mock replicas (no Ray); the fuzzer (tests/cpu/test_fuzz.py) sends the schema's
own examples."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.helpers.serving import asgi_client, inproc_app, mock_config

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MODEL = "specfleet-demo"
USER = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **kw}


def completion(**kw):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}


@pytest.fixture
def served(tmp_path):
    cfg = mock_config(tmp_path, limits={"max_tokens": 64, "max_stop": 2, "max_messages": 8},
                      replicas=[{"mock": {"max_model_len": 512, "step_ms": 0}}])
    return inproc_app(cfg)


@pytest.fixture
def spec(served):
    return served[0].openapi()


def _props(spec, name):
    return spec["components"]["schemas"][name]["properties"]


def test_every_operation_documents_its_real_statuses_with_the_error_body(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "422" not in codes, f"{method} {path}: the server never answers 422 (validation is a 400)"
            assert "400" in codes, f"{method} {path}"
            for code in codes - {"200"} - ({"503"} if path == "/health" else set()):  # /health: its own body
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (method, path, code)
            if path.startswith("/v1/"):
                assert "401" in codes, f"{method} {path}: keys can be configured"
    assert {"404", "413", "429", "503"} <= set(spec["paths"][CHAT]["post"]["responses"])
    assert "404" in spec["paths"]["/v1/sessions/{sid}"]["delete"]["responses"]
    assert set(spec["paths"]["/v1/sessions"]["post"]["responses"]) >= {"413", "429"}
    assert "503" in spec["paths"]["/health"]["get"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"], "Prometheus text, not JSON"


async def test_metrics_answer_prometheus_text(served):
    async with asgi_client(served[0]) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("field, bad, neutral, endpoint", [
    ("n", 2, 1, CHAT), ("presence_penalty", 0.5, 0, CHAT), ("frequency_penalty", -1.0, 0.0, COMPLETIONS),
    ("logprobs", True, False, CHAT), ("logprobs", 2, 0, COMPLETIONS), ("logit_bias", {"5": 1.0}, {}, CHAT),
    ("suffix", "tail", "", COMPLETIONS), ("best_of", 3, 1, COMPLETIONS),
])
async def test_unsupported_knobs_are_const_in_the_schema_and_refused_otherwise(served, spec, field, bad, neutral,
                                                                              endpoint):
    name = "ChatCompletionRequest" if endpoint == CHAT else "CompletionRequest"
    schema = _props(spec, name)[field]
    allowed = schema["anyOf"][0]
    assert allowed.get("const", neutral if allowed.get("maxProperties") == 0 else None) == neutral, schema
    body = (chat if endpoint == CHAT else completion)(**{field: bad})
    async with asgi_client(served[0]) as c:
        r = await c.post(endpoint, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "supported" in r.json()["error"]["message"]
        r = await c.post(endpoint, json=(chat if endpoint == CHAT else completion)(**{field: neutral}))
        assert r.status_code == 200, r.text


async def test_top_logprobs_without_logprobs_is_a_400(served, spec):
    assert _props(spec, "ChatCompletionRequest")["top_logprobs"]["type"] == "null"
    async with asgi_client(served[0]) as c:
        r = await c.post(CHAT, json=chat(top_logprobs=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


async def test_tool_choice_without_tools_is_a_400(served):
    async with asgi_client(served[0]) as c:
        r = await c.post(CHAT, json=chat(tool_choice="auto"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


async def test_prompt_as_the_schema_says(served, spec):
    prompt = _props(spec, "CompletionRequest")["prompt"]["anyOf"]
    assert prompt[0] == {"type": "string", "minLength": 1}
    vocab = served[1].vocab_size
    assert prompt[1]["items"]["maximum"] == vocab - 1 and prompt[1]["minItems"] == 1
    assert prompt[2]["maxItems"] == 1 and prompt[3]["maxItems"] == 1
    async with asgi_client(served[0]) as c:
        assert (await c.post(COMPLETIONS, json=completion(prompt=""))).status_code == 400
        assert (await c.post(COMPLETIONS, json=completion(prompt=[vocab]))).status_code == 400
        assert (await c.post(COMPLETIONS, json=completion(prompt=[vocab - 1]))).status_code == 200
        assert (await c.post(COMPLETIONS, json=completion(prompt=["a", "b"]))).status_code == 400


def test_config_limits_are_in_the_schema(spec):
    chat_props = _props(spec, "ChatCompletionRequest")
    assert chat_props["max_tokens"]["anyOf"][0]["maximum"] == 64
    assert chat_props["messages"]["maxItems"] == 8
    stop = {b.get("type"): b for b in chat_props["stop"]["anyOf"]}
    assert stop["string"]["minLength"] == 1 and stop["array"]["maxItems"] == 2
    assert stop["array"]["items"]["minLength"] == 1


def test_the_mock_engine_publishes_no_grammar_features(spec):
    chat_props = _props(spec, "ChatCompletionRequest")
    assert "tools" not in chat_props  # the mock engine answers 400 to constrained requests
    assert chat_props["tool_choice"]["anyOf"][0] == {"const": "none"}


async def test_messages_are_typed_per_role(served, spec):
    one_of = _props(spec, "ChatCompletionRequest")["messages"]["items"]["oneOf"]
    assert len(one_of) == 4
    tool = spec["components"]["schemas"]["ToolMessage"]
    assert "tool_call_id" in tool["required"] and tool["properties"]["tool_call_id"]["minLength"] == 1
    assert "tool_calls" not in spec["components"]["schemas"]["UserMessage"]["properties"]
    async with asgi_client(served[0]) as c:
        r = await c.post(CHAT, json=chat(messages=USER + [{"role": "tool", "content": "r"}]))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages.1.tool_call_id", r.text
        assert "tool messages" in err["message"] and err["code"] == "missing_parameter"
        r = await c.post(CHAT, json=chat(messages=[{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages.0.tool_calls", r.text
        assert err["message"].startswith("tool_calls is not valid on a user message")


async def test_405_allow_header_names_every_method_of_the_path(served):
    async with asgi_client(served[0]) as c:
        r = await c.put("/v1/sessions/sess_x")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET", r.headers
        assert r.json()["error"]["message"]
        r = await c.get(CHAT)
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def _requests(state) -> dict[tuple[str, str], float]:
    text = state.metrics.render()[0].decode()
    return {(e, s): float(v) for e, s, v in re.findall(
        r'specfleet_requests_total\{endpoint="([^"]+)",status="([^"]+)"\} (\S+)', text)}


async def test_requests_total_counts_every_outcome_by_status(tmp_path):
    cfg = mock_config(tmp_path, limits={"max_body_bytes": 2048, "per_key_concurrency": 1, "per_key_queue": 0},
                      replicas=[{"mock": {"step_ms": 20}}])
    app, state, _ = inproc_app(cfg)
    async with asgi_client(app) as c, asgi_client(app, key=None) as anon:
        assert (await c.post(CHAT, json=chat())).status_code == 200
        assert (await c.post(CHAT, json=chat(n=3))).status_code == 400
        assert (await anon.post(CHAT, json=chat())).status_code == 401
        assert (await c.post(CHAT, json=chat(model="nope"))).status_code == 404
        assert (await c.post(CHAT, content=b"x" * 4096, headers={"content-type": "application/json"})
                ).status_code == 413
        first = asyncio.create_task(c.post(CHAT, json=chat(max_tokens=40)))
        await asyncio.sleep(0.1)
        assert (await c.post(CHAT, json=chat())).status_code == 429  # the key's only slot is taken
        assert (await first).status_code == 200
        assert (await c.get("/v1/sessions/sess_missing")).status_code == 404
    counts = _requests(state)
    for key, n in {("chat", "200"): 2, ("chat", "400"): 1, ("chat", "401"): 1, ("chat", "404"): 1,
                   ("chat", "413"): 1, ("chat", "429"): 1, ("sessions", "404"): 1}.items():
        assert counts.get(key) == n, (key, counts)


async def test_one_x_request_id_echoing_the_clients(served):
    app, state, _ = served
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json=chat(), headers={"x-request-id": "client-42"})
        assert r.headers.get_list("x-request-id") == ["client-42"]
        r = await c.post(CHAT, json=chat())
        assert len(r.headers.get_list("x-request-id")) == 1 and r.headers["x-request-id"]
        state.behind_proxy = True  # Ray Serve's proxy sets it: the ingress must not add a second one
        r = await c.post(CHAT, json=chat(), headers={"x-request-id": "client-43"})
        assert r.status_code == 200 and r.headers.get_list("x-request-id") == []


@pytest.mark.parametrize("header", ["x-session-id", "x-request-id", "x-agent-role"])
async def test_a_non_utf8_header_is_a_400_naming_it(served, header):
    app, state, _ = served
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json=chat(), headers=[(header.encode(), b"sess_\xff\xfe")])
        assert r.status_code == 400 and r.json()["error"]["param"] == header, r.text
        assert r.json()["error"]["code"] == "invalid_header"
        r = await c.post(CHAT, json=chat(), headers=[(header.encode(), "café".encode())])  # UTF-8 is fine
        assert r.status_code in (200, 404), r.text  # (404: no such session)
    assert state.in_flight == 0


async def test_the_header_guard_runs_in_front_of_serves_proxy_decoding():
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=orchestrator.api.middleware:proxy_middlewares does in Ray
    Serve's proxy: the guard wraps it, so the proxy's `value.decode()` (a 500 on 0xff) never sees such a header."""
    from ray.serve._private.http_util import _apply_middlewares

    from orchestrator.api.middleware import HeaderGuard, bad_header, proxy_middlewares

    async def proxy_like(scope, receive, send):  # ray/serve/_private/proxy.py decodes these headers like this
        for key, value in scope["headers"]:
            if key.decode() in ("x-session-id", "x-request-id"):
                value.decode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = _apply_middlewares(proxy_like, proxy_middlewares())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://proxy") as c:
        r = await c.get("/", headers=[(b"x-request-id", b"\xff")])
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-id"
        assert (await c.get("/", headers=[(b"x-session-id", b"ok")])).status_code == 200
    assert bad_header([(b"x-team-id", b"\xc3\x28")]) == "x-team-id" and bad_header([(b"accept", b"\xff")]) is None
    assert isinstance(HeaderGuard(proxy_like), HeaderGuard)


class _SlowPrefillBackend:
    """A replica that is dispatched at once and sends its first item after `delay_s` (a long prefill), or, with
    dispatch=False, never gets a replica at all (Serve's queue)."""

    def __init__(self, inner, delay_s: float, dispatch: bool = True):
        self.inner, self.delay_s, self.dispatch = inner, delay_s, dispatch
        self.directory = inner.directory

    def stream(self, session_id, kwargs):
        from orchestrator.routing.decisions import DISPATCHES

        rid = kwargs["route"]["request_id"]
        inner = self.inner.stream(session_id, kwargs)
        if not self.dispatch:
            DISPATCHES.pop(rid)

        async def gen():
            await asyncio.sleep(self.delay_s)
            async for item in inner:
                yield item
        return gen()


async def test_queue_timeout_covers_admission_not_the_prefill(tmp_path):
    cfg = mock_config(tmp_path, limits={"queue_timeout_s": 0.3}, replicas=[{"mock": {"step_ms": 0}}])
    app, state, _ = inproc_app(cfg)
    local = state.backend
    state.backend = _SlowPrefillBackend(local, delay_s=1.0)  # accepted at once, prefill 3x the queue timeout
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json=chat())
        assert r.status_code == 200, r.text
        state.backend = _SlowPrefillBackend(local, delay_s=5.0, dispatch=False)  # no replica takes it
        r = await c.post(CHAT, json=chat())
        assert r.status_code == 429 and r.json()["error"]["code"] == "no_capacity", r.text
        assert "accepted" in r.json()["error"]["message"] and r.headers["retry-after"]
    assert state.in_flight == 0
