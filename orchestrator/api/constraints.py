"""What the grammar must enforce for one chat request: `response_format` and `tools` / `tool_choice` -> the
engine's structured-output constraint (a plain dict; the engine compiles it with xgrammar). Pure, torch-free.

    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "schema": {...}}                  JSON matching the schema
    {"type": "structural_tag", "structural_tag": {...}}       xgrammar structural tag (tool calls)

plus "param": the request field the constraint comes from (named in a 400 if the engine cannot compile it).

Tool calls use the Hermes format of orchestrator/api/tool_parser.py:
- `auto`: free text; where the text starts "<tool_call>", a complete call of one of the tools must follow
  (triggered tags); any number of calls (one with `parallel_tool_calls: false`);
- `required`: one or more calls and nothing else (one with `parallel_tool_calls: false`);
- named: exactly one call of that function;
- `none`: no constraint from the tools.
With a JSON `response_format` and `auto`, the output is either tool calls or the JSON.
"""
from __future__ import annotations

import json
from typing import Any

from orchestrator.api.errors import APIError
from orchestrator.api.json_schema_check import check_schema
from orchestrator.api.tool_parser import ARGS_PREFIX, CALL_PREFIX, CALL_SEPARATOR, CALL_SUFFIX, OPEN
from orchestrator.api.tool_schemas import JSONObjectFormat, JSONSchemaResponseFormat, NamedToolChoice, Tool

MAX_WHITESPACE = 16  # consecutive whitespace characters allowed inside constrained JSON (no endless newlines)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def check_tools(tools: list[Tool] | None, tool_choice: Any) -> None:
    """Unique names, valid parameter schemas, a named choice that exists. Raises APIError(400)."""
    seen: set[str] = set()
    for i, t in enumerate(tools or []):
        name = t.function.name
        if name in seen:
            raise APIError(400, f"two tools are named '{name}'", param=f"tools.{i}.function.name",
                           code="duplicate_tool_name")
        seen.add(name)
        if t.function.parameters is not None:
            check_schema(t.function.parameters, f"tools.{i}.function.parameters")
            if t.function.parameters.get("type", "object") != "object":
                raise APIError(400, "function parameters must be a JSON schema of type 'object'",
                               param=f"tools.{i}.function.parameters.type", code="invalid_json_schema")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in seen:
        raise APIError(400, f"tool_choice names the function '{tool_choice.function.name}', which is not in tools",
                       param="tool_choice.function.name", code="unknown_tool")
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool", param="tool_choice",
                       code="invalid_value")


def _call_tag(tool: Tool) -> dict:
    return {"type": "tag", "begin": CALL_PREFIX + tool.function.name + ARGS_PREFIX,
            "content": {"type": "json_schema", "json_schema": tool.function.parameters or NO_ARGUMENTS,
                        "max_whitespace_cnt": MAX_WHITESPACE},
            "end": CALL_SUFFIX}


def _calls_only(tools: list[Tool], parallel: bool) -> dict:
    return {"type": "tags_with_separator", "tags": [_call_tag(t) for t in tools], "separator": CALL_SEPARATOR,
            "at_least_one": True, "stop_after_first": not parallel}


def _tag(fmt: dict) -> dict:
    return {"type": "structural_tag", "structural_tag": {"type": "structural_tag", "format": fmt},
            "param": "tools"}


def tool_constraint(tools: list[Tool] | None, tool_choice: Any, parallel: bool | None,
                    response: dict | None) -> dict | None:
    """The constraint for the tools (combined with the response_format's, `response`); None = unconstrained."""
    parallel = True if parallel is None else parallel
    if not tools or tool_choice == "none":
        return response
    if isinstance(tool_choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == tool_choice.function.name)
        return _tag(_call_tag(tool))
    if tool_choice == "required":
        return _tag(_calls_only(tools, parallel))
    # auto
    if response is not None:
        schema = response.get("schema") or {"type": "object"}
        return _tag({"type": "or", "elements": [
            _calls_only(tools, parallel),
            {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}]})
    return _tag({"type": "triggered_tags", "triggers": [OPEN], "tags": [_call_tag(t) for t in tools],
                 "stop_after_first": not parallel})


def response_constraint(fmt: Any) -> dict | None:
    """response_format -> constraint dict (or None for text). Raises APIError(400) for a bad schema."""
    if isinstance(fmt, JSONObjectFormat):
        return {"type": "json_object", "param": "response_format"}
    if isinstance(fmt, JSONSchemaResponseFormat):
        schema = fmt.json_schema.schema_
        if schema is None:
            raise APIError(400, "response_format.json_schema.schema is required", param="response_format.json_schema.schema",
                           code="missing_parameter")
        check_schema(schema, "response_format.json_schema.schema")
        return {"type": "json_schema", "schema": schema, "param": "response_format.json_schema.schema"}
    return None


def engine_constraint(c: dict | None) -> dict | None:
    """The constraint as the engine receives it: the grammar source as JSON text (also its compile-cache key)."""
    if c is None:
        return None
    kind = c["type"]
    if kind == "json_schema":
        spec = json.dumps(c["schema"])  # key order kept: the grammar follows the declared order
    elif kind == "structural_tag":
        spec = json.dumps(c["structural_tag"])
    else:
        spec = ""
    return {"kind": kind, "spec": spec, "param": c.get("param")}
