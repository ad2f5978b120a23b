"""Tool calling and structured outputs for /v1/chat/completions: the request's plan (prompt, grammar constraint,
what to parse) and the shaping of the answer (`message.tool_calls`, `finish_reason: "tool_calls"`, stream
deltas). The request edge is orchestrator/api/tool_schemas.py; the pieces: chat_prompt (template),
constraints (grammar), tool_parser (output), json_schema_check (schemas).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from orchestrator.api.chat_prompt import render
from orchestrator.api.constraints import check_tools, engine_constraint, response_constraint, tool_constraint
from orchestrator.api.errors import APIError
from orchestrator.api.json_schema_check import validate_instance
from orchestrator.api.tool_parser import ToolCallStream, parse_tool_calls

log = logging.getLogger("specfleet.api")


@dataclass
class ChatPlan:
    prompt: str  # prompt text (chat template applied)
    constraint: dict | None = None  # the engine's structured-output constraint {"kind", "spec", "param"}
    tool_names: set[str] = field(default_factory=set)  # parse tool calls from the output when non-empty
    schema: dict | None = None  # response_format json_schema: the output is re-checked against it
    json_output: bool = False  # response_format json_object / json_schema
    calls_only: bool = False  # tool_choice required / named: the output is tool calls and nothing else

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    @property
    def grammar_ends_output(self) -> bool:
        """The whole output is grammar-shaped (JSON, or calls only): stop strings / ignore_eos would break it."""
        return self.constraint is not None and (self.json_output or self.calls_only)


def plan_chat(tok: Any, body: Any) -> ChatPlan:
    """Validate the tools / response_format / history of a ChatCompletionRequest and build its plan."""
    tools, choice = body.tools or None, body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    check_tools(tools, choice)
    response = response_constraint(body.response_format)
    choice = "auto" if choice is None else choice
    active = bool(tools) and choice != "none"
    constraint = tool_constraint(tools, choice, body.parallel_tool_calls, response)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if active else None
    plan = ChatPlan(prompt=render(tok, body.messages, tool_dicts), constraint=engine_constraint(constraint),
                    tool_names={t.function.name for t in tools} if active else set(),
                    schema=(response or {}).get("schema"), json_output=response is not None,
                    calls_only=active and choice != "auto")
    if plan.grammar_ends_output:
        if body.stop:
            raise APIError(400, "stop sequences cannot be combined with a grammar-constrained response "
                           "(response_format json, or tool_choice required / a named function): the grammar "
                           "decides where the output ends", param="stop", code="invalid_value")
        if body.ignore_eos:
            raise APIError(400, "ignore_eos cannot be combined with a grammar-constrained response",
                           param="ignore_eos", code="invalid_value")
    return plan


def output_problem(plan: ChatPlan, content: str | None, finish: str) -> str | None:
    """A finished JSON answer must parse and match its schema (None = fine). A mismatch is a server bug (the
    grammar should have made it impossible), reported as such instead of returning unchecked output."""
    if not plan.json_output or finish != "stop" or content is None:
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return "not JSON"
    if plan.schema is not None:
        return validate_instance(value, plan.schema)
    return None if isinstance(value, dict) else "not a JSON object"


def invalid_output(problem: str) -> APIError:
    log.error("constrained output failed its check: %s", problem)
    return APIError(503, f"the grammar-constrained output failed validation ({problem}); please retry",
                    code="structured_output_invalid", type="server_error")


def _guard(plan: ChatPlan, content: str | None, finish: str) -> None:
    problem = output_problem(plan, content, finish)
    if problem:
        raise invalid_output(problem)


def chat_message(plan: ChatPlan, text: str, finish: str) -> tuple[dict, str, int]:
    """Whole output -> (assistant message, finish_reason, number of tool calls)."""
    if not plan.tool_names:
        _guard(plan, text, finish)
        return {"role": "assistant", "content": text}, finish, 0
    content, calls = parse_tool_calls(text, plan.tool_names, incremental=plan.constrained)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [c.to_openai() for c in calls]
        return msg, ("tool_calls" if finish == "stop" else finish), len(calls)
    _guard(plan, content, finish)
    return msg, finish, 0


class ChatDeltas:
    """Streamed output -> OpenAI `delta` dicts (content and tool_calls), then the finish_reason."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self.stream = ToolCallStream(plan.tool_names, incremental=plan.constrained) if plan.tool_names else None
        self.text: list[str] = []

    @property
    def first_delta(self) -> dict:
        return {"role": "assistant", "content": None if self.stream is not None else ""}

    def feed(self, text: str) -> list[dict]:
        self.text.append(text)
        if self.stream is None:
            return [{"content": text}] if text else []
        return [_delta(ev) for ev in self.stream.feed(text)]

    def close(self) -> list[dict]:
        return [] if self.stream is None else [_delta(ev) for ev in self.stream.close()]

    def finish_reason(self, finish: str) -> str:
        if self.stream is not None and self.stream.calls and finish == "stop":
            return "tool_calls"
        return finish

    @property
    def tool_calls(self) -> int:
        return len(self.stream.calls) if self.stream is not None else 0


def _delta(ev: dict) -> dict:
    if "content" in ev:
        return {"content": ev["content"]}
    return {"tool_calls": [ev["tool_call"]]}
