"""The output guard of structured answers (orchestrator/api/tools.py): a finished JSON answer is re-checked
against its schema before it is returned, so a grammar bug becomes a 503 `structured_output_invalid`, never
invalid JSON reported as valid; an answer cut by max_tokens (`length`) is returned as such, unchecked.
Pure: no engine, no app (the end-to-end paths are tests/cpu/test_tools_api.py)."""
from __future__ import annotations

import json

import pytest

from orchestrator.api.errors import APIError
from orchestrator.api.tools import ChatPlan, chat_message, output_problem

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
CONSTRAINT = {"kind": "json_schema", "spec": json.dumps(SCHEMA), "param": "response_format"}


def _plan(schema: dict | None = SCHEMA, tools: set[str] | None = None) -> ChatPlan:
    return ChatPlan(prompt="p", constraint=CONSTRAINT, schema=schema, json_output=True, tool_names=tools or set())


@pytest.mark.parametrize("content, problem", [
    ('{"city": "Paris", "days": 3}', None),
    ('{"city": "Paris"', "not JSON"),
    ('{"city": "Paris", "days": 12}', "12 is greater than the maximum of 9 (at /days)"),
    ('{"city": "Paris", "days": 3, "x": 1}', "Additional properties are not allowed"),
])
def test_a_finished_answer_is_checked_against_its_schema(content, problem):
    got = output_problem(_plan(), content, "stop")
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


def test_json_object_mode_needs_an_object_and_a_cut_answer_is_not_checked():
    plan = _plan(schema=None)
    assert output_problem(plan, '{"a": [1, 2]}', "stop") is None
    assert output_problem(plan, "[1, 2]", "stop") == "not a JSON object"
    assert output_problem(_plan(), '{"city": "Pa', "length") is None  # finish_reason "length" says it is cut
    assert output_problem(ChatPlan(prompt="p"), "free text", "stop") is None  # nothing to check


def test_an_invalid_finished_answer_is_a_503_never_returned():
    with pytest.raises(APIError) as e:
        chat_message(_plan(), '{"city": "Paris", "days": "three"}', "stop")
    assert e.value.status == 503 and e.value.code == "structured_output_invalid" and e.value.type == "server_error"
    msg, finish, calls = chat_message(_plan(), '{"city": "Paris", "days": 3}', "stop")
    assert msg == {"role": "assistant", "content": '{"city": "Paris", "days": 3}'} and finish == "stop" and calls == 0
    msg, finish, _ = chat_message(_plan(), '{"city": "Pa', "length")
    assert finish == "length" and msg["content"] == '{"city": "Pa'


def test_with_tools_the_calls_are_returned_and_a_json_answer_is_still_checked():
    plan = _plan(tools={"get_weather"})  # tool_choice auto + response_format: calls or the JSON
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    msg, finish, calls = chat_message(plan, call, "stop")
    assert finish == "tool_calls" and calls == 1 and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    with pytest.raises(APIError):
        chat_message(plan, '{"city": 5, "days": 1}', "stop")
