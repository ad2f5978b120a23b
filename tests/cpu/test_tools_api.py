"""The OpenAI tools API and structured outputs end to end, with the official openai SDK, over the in-process
app and a real engine (a tiny random model, the 128-token character tokenizer, a random DFlash drafter):
the grammar path is the real one, the model is random, so the tests check shapes and validity, not content.

- tool_choice named / required / auto, parallel_tool_calls, streamed and not: `message.tool_calls`,
  `finish_reason: "tool_calls"`, streamed deltas assembled by the SDK equal the non-streamed answer;
- `client.chat.completions.parse(response_format=<pydantic model>)` returns a parsed object; json_object;
- a multi-turn tool loop (call -> tool result -> answer) through a session, with session stats and /metrics;
- bad input: 400 naming the field; the mock engine refuses constrained requests with a 400.
"""
from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from orchestrator.api.server import create_app
from orchestrator.api.state import LocalBackend, ServerState
from orchestrator.replica import ReplicaCore
from tests.helpers.char_tokenizer import make_char_model_dir
from tests.helpers.serving import asgi_client, inproc_app, mock_config
from tests.helpers.tiny import tiny_engine
from workers.engine.async_engine import AsyncLLMEngine

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "specfleet-demo"
WEATHER = {"type": "object", "properties": {
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "description": "Current time"}}]
USER = [{"role": "user", "content": "What will the weather be in Paris?"}]


class Verdict(BaseModel):
    ok: bool
    level: Literal["low", "mid", "high"]
    score: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = make_char_model_dir(tmp_path_factory.mktemp("tools"), max_position_embeddings=4096)  # tool prompts: ~700 chars
    eng, _ = tiny_engine(d, "llama", drafter_block=8)
    cfg = mock_config(d)
    spec = cfg.fleet()[0]
    core = ReplicaCore(AsyncLLMEngine(eng), spec, replica_id="r0", rank=0, block_size=8, spec_available=True)
    state = ServerState.create(cfg, LocalBackend([core]), tokenizer=eng.tokenizer, max_model_len=eng.max_model_len)
    yield create_app(state), state, core
    core.engine._stop = True


def _client(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app[0]), base_url="http://test")
    return openai.AsyncOpenAI(api_key="key-a", base_url="http://test/v1", http_client=http, max_retries=0)


async def _streamed(c: openai.AsyncOpenAI, **kw):
    """The SDK's own assembly of a stream (`chat.completions.stream`) -> the final ChatCompletion."""
    async with c.chat.completions.stream(**kw) as s:
        async for _ in s:
            pass
        try:
            return await s.get_final_completion()
        except openai.LengthFinishReasonError as e:  # the SDK raises on "length"; the completion is attached
            return e.completion


def _check_call(tc) -> dict:
    assert tc.type == "function" and tc.id.startswith("call_")
    args = json.loads(tc.function.arguments)
    if tc.function.name == "get_weather":
        jsonschema.validate(args, WEATHER)
    else:
        assert tc.function.name == "now" and args == {}
    return args


async def test_named_tool_choice_streamed_and_not_give_the_same_call(app):
    c = _client(app)
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=120,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = await c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert len(ch.message.tool_calls) == 1 and ch.message.tool_calls[0].function.name == "get_weather"
    args = _check_call(ch.message.tool_calls[0])
    fc = (await _streamed(c, **kw)).choices[0]
    assert fc.finish_reason == "tool_calls" and len(fc.message.tool_calls) == 1
    assert json.loads(fc.message.tool_calls[0].function.arguments) == args  # greedy: the same call
    assert fc.message.tool_calls[0].function.name == "get_weather"


async def test_required_with_and_without_parallel_calls(app):
    c = _client(app)
    for parallel in (False, True):
        r = await c.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=parallel, max_tokens=200, temperature=0.8, seed=3)
        ch = r.choices[0]
        assert ch.message.tool_calls, ch
        if not parallel:
            assert len(ch.message.tool_calls) == 1
        if ch.finish_reason != "length":
            assert ch.finish_reason == "tool_calls"
            for tc in ch.message.tool_calls:
                _check_call(tc)


async def test_auto_and_none_return_text_or_valid_calls(app):
    c = _client(app)
    for choice in ("auto", "none"):
        for stream in (False, True):
            kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=24)
            if stream:
                ch = (await _streamed(c, **kw)).choices[0]
            else:
                ch = (await c.chat.completions.create(**kw)).choices[0]
            assert ch.finish_reason in ("stop", "length", "tool_calls")
            for tc in ch.message.tool_calls or []:
                assert choice == "auto"
                _check_call(tc)
            if ch.finish_reason != "tool_calls":
                assert isinstance(ch.message.content, str)


async def test_parse_with_a_pydantic_model_and_json_object_mode(app):
    c = _client(app)
    for stream in (False, True):
        kw = dict(model=MODEL, messages=USER, response_format=Verdict, max_tokens=400)  # whitespace runs: <= 16
        if stream:
            r = await _streamed(c, **kw)
        else:
            r = await c.chat.completions.parse(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Verdict), r
        assert Verdict.model_validate_json(msg.content) == msg.parsed
    r = await c.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"},
                                        max_tokens=200)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length"


def _metric(text: str, name: str) -> float:
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


async def test_a_tool_loop_through_a_session(app):
    c = _client(app)
    async with asgi_client(app[0]) as h:
        sid = (await h.post("/v1/sessions", json={"role": "agent"})).json()["id"]
        calls_before = _metric((await h.get("/metrics")).text, "specfleet_tool_calls_total")
    headers = {"x-session-id": sid}
    messages = list(USER)
    for stream in (False, True):
        kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=120, extra_headers=headers,
                  extra_body={"spec": {"enabled": True}})  # the random drafter would get speculation turned off
        if stream:
            msg = (await _streamed(c, **kw)).choices[0].message
        else:
            msg = (await c.chat.completions.create(**kw)).choices[0].message
        call = msg.tool_calls[0]
        _check_call(call)
        messages = messages + [msg, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'}]
        answer = await c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                                 max_tokens=16, extra_headers=headers)
        assert answer.choices[0].message.tool_calls is None
        assert isinstance(answer.choices[0].message.content, str)
        messages.append(answer.choices[0].message)
        messages.append({"role": "user", "content": "And tomorrow?"})
    async with asgi_client(app[0]) as h:
        s = (await h.get(f"/v1/sessions/{sid}")).json()
        metrics = (await h.get("/metrics")).text
    assert s["turns"] == 4 and s["tool_calls"] == 2 and s["constrained_turns"] == 2
    assert [t["tool_calls"] for t in s["replica_history"]] == [1, 0, 1, 0]
    assert [t["constrained"] for t in s["replica_history"]] == ["structural_tag", None, "structural_tag", None]
    assert s["tau_constrained"] is not None and s["tau_constrained"] >= 1.0
    routing = app[2].routing_stats()  # what the router sees
    assert routing["tau_by_constraint"]["structural_tag"][1] >= 1 and sid in routing["tau_by_constrained_session"]
    assert _metric(metrics, "specfleet_tool_calls_total") - calls_before == 2
    assert "specfleet_constrained_accepted_length_bucket" in metrics and 'specfleet_constrained_turns_total{kind="structural_tag"}' \
        in metrics


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema.type", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema.uniqueItems",
     "unsupported_schema_feature"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
     "response_format.json_schema.schema.properties.a.$ref", "invalid_json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {  # refused by the engine
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format.json_schema.schema", "invalid_request"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": [{"$ref": "#"}]}}}},
     "response_format.json_schema.schema", "invalid_request"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name",
     "missing_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "format": "color"}}}}}]}, "tools.0.function.parameters.properties.a.format",
     "unsupported_schema_feature"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice.function.name", "unknown_tool"),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop", None),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", None),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_nope", "content": "x"}]},
     "messages.1.tool_call_id", "unknown_tool_call_id"),
]


@pytest.mark.parametrize("extra, param, code", BAD)
async def test_bad_input_is_a_400_naming_the_field(app, extra, param, code):
    async with asgi_client(app[0]) as h:
        r = await h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 8, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if code:
        assert err["code"] == code, err


async def test_the_mock_engine_refuses_constrained_requests_with_a_400(tmp_path):
    app = inproc_app(mock_config(tmp_path))[0]
    async with asgi_client(app) as h:
        r = await h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": TOOLS})
        assert r.status_code == 400 and "mock engine" in r.json()["error"]["message"]
        r = await h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": TOOLS,
                                                       "tool_choice": "none", "max_tokens": 8})
        assert r.status_code == 200  # tool_choice none: no grammar, plain text
