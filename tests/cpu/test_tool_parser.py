"""Tool-call output parsing (Hermes format), whole and streamed, assembled exactly as the openai SDK does;
the chat prompt with tools (native template and the fallback); the constraint builder's output compiles."""
from __future__ import annotations

import json

import pytest
from openai.lib.streaming._deltas import accumulate_delta
from pydantic import TypeAdapter

from orchestrator.api.chat_prompt import fallback_messages, history, native_tools, render
from orchestrator.api.errors import APIError
from orchestrator.api.schemas import ChatMessage
from orchestrator.api.tool_parser import ARGS_PREFIX, CALL_PREFIX, CALL_SUFFIX, ToolCallStream, parse_tool_calls

NAMES = {"get_weather", "lookup"}
CALL1 = CALL_PREFIX + "get_weather" + ARGS_PREFIX + '{"city": "Paris", "unit": "celsius"}' + CALL_SUFFIX
CALL2 = CALL_PREFIX + "lookup" + ARGS_PREFIX + '{"q": "a } </tool_call"}' + CALL_SUFFIX
OUTPUTS = [
    "Just text, no calls.",
    CALL1,
    "Let me check.\n" + CALL1 + "\n" + CALL2,
    CALL1 + "\n" + CALL2 + "\n",
    "Text that mentions <tool_c but is not a call <",
    "<tool_call>\nnot json\n</tool_call> then text",
    '<tool_call>\n{"name": "unknown_fn", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"arguments": {"x": 1}, "name": "lookup"}\n</tool_call>',  # keys in another order
    CALL1[:-8],  # cut inside the block (max_tokens)
]


def _assemble(events: list[dict]) -> dict:
    """The official SDK's accumulation of streamed deltas (openai.lib.streaming._deltas)."""
    acc: dict = {"role": "assistant", "content": None}
    for ev in events:
        delta = {"content": ev["content"]} if "content" in ev else {"tool_calls": [ev["tool_call"]]}
        acc = accumulate_delta(acc, delta)
    return acc


@pytest.mark.parametrize("text", OUTPUTS)
@pytest.mark.parametrize("incremental", [False, True])
def test_streamed_deltas_assemble_to_the_whole_parse_at_any_split(text, incremental):
    content, calls = parse_tool_calls(text, NAMES)
    if text.startswith(CALL1[:20]) and not text.endswith("</tool_call>") and "\n" + CALL2 not in text:
        assert calls == [] and content == text  # an unfinished block is never a call
    for step in (1, 2, 3, 7, len(text)):
        s = ToolCallStream(NAMES, incremental=incremental)
        events = []
        for i in range(0, len(text), step):
            events += s.feed(text[i: i + step])
        events += s.close()
        got = _assemble(events)
        if incremental and s.streamed_partial_call:
            continue  # a cut call was already streamed (finish_reason says "length")
        assert got["content"] == content
        want = [(c.name, c.arguments) for c in calls]
        have = [(tc["function"]["name"], tc["function"]["arguments"]) for tc in got.get("tool_calls") or []]
        assert have == want
        for tc in got.get("tool_calls") or []:
            assert tc["id"].startswith("call_") and len(tc["id"]) == 29 and tc["type"] == "function"
            json.loads(tc["function"]["arguments"])


def test_parse_results():
    content, calls = parse_tool_calls("Let me check.\n" + CALL1 + "\n" + CALL2, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("lookup", {"q": "a } </tool_call"})]
    assert parse_tool_calls(OUTPUTS[7], NAMES)[1][0].arguments == '{"x": 1}'
    assert parse_tool_calls(OUTPUTS[6], NAMES) == (OUTPUTS[6], [])


def test_incremental_stream_sends_the_name_before_the_block_ends():
    s = ToolCallStream(NAMES, incremental=True)
    events = s.feed(CALL_PREFIX + "get_weather" + ARGS_PREFIX + '{"city": "Pa')
    assert events[0]["tool_call"]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(e["tool_call"]["function"]["arguments"] for e in events) == '{"city": "Pa'
    events = s.feed('ris"}}\n</tool_')  # the last brace may be the block's end: held back
    assert [e["tool_call"] for e in events] == [{"index": 0, "function": {"arguments": 'ris"}'}}]
    assert s.feed("call>") == [] and s.close() == []
    assert [(c.name, c.arguments) for c in s.calls] == [("get_weather", '{"city": "Paris"}')]


# ---------------------------------------------------------------- prompts
class _Tok:
    """A tokenizer stand-in whose template shows what it is given."""

    def __init__(self, template: str):
        self.chat_template = template
        self.seen: dict = {}

    def apply_chat_template(self, msgs, tools=None, tokenize=False, add_generation_prompt=True):
        self.seen = {"msgs": msgs, "tools": tools}
        return "".join(f"[{m['role']}]{m['content']}" for m in msgs) + "[assistant]"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _msgs(*rows):
    return [TypeAdapter(ChatMessage).validate_python(r) for r in rows]


HISTORY = _msgs(
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24C"})


def test_fallback_prompt_puts_tools_in_the_system_message_and_history_in_hermes_blocks():
    tok = _Tok("{% for m in messages %}{{ m.content }}{% endfor %}")  # no tool support (like the demo model's)
    assert not native_tools(tok)
    text = render(tok, HISTORY, TOOLS)
    msgs = tok.seen["msgs"]
    assert tok.seen["tools"] is None and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_weather"' in msgs[0]["content"]
    assert "<tool_call>" in msgs[0]["content"] and "\\u003c" not in msgs[0]["content"]
    assert msgs[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert msgs[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response>"
    assert text.endswith("[assistant]")


def test_native_template_gets_tools_and_structured_history():
    tok = _Tok("{% if tools %}<tools>{% endif %}<tool_call>")
    assert native_tools(tok)
    render(tok, HISTORY, TOOLS)
    msgs = tok.seen["msgs"]
    assert tok.seen["tools"] == TOOLS
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object, as templates expect
    assert msgs[3] == {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"}


@pytest.mark.parametrize("rows, param", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
     "messages.1.tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "not json"}}]}],
     "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_history_is_a_400_naming_the_field(rows, param):
    with pytest.raises(APIError) as e:
        history(_msgs(*rows))
    assert e.value.status == 400 and e.value.param == param


def test_fallback_without_tools_this_turn_keeps_the_history_readable():
    msgs = fallback_messages(history(HISTORY), None)
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[-1]["role"] == "user"
