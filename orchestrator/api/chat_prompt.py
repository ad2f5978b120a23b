"""Chat messages (+ tools) -> prompt text, through the model's chat template.

History checks (400 naming the field): a `tool` message's `tool_call_id` must match a call of an earlier
assistant message; tool call ids are unique and their arguments a JSON object. (Which fields each role may
carry is checked at the edge: orchestrator/api/schemas.py types messages per role.)

Tools reach the model in one of two ways:
- native: the model's template renders `tools`, assistant `tool_calls` and `tool` messages itself and asks for
  Hermes-format calls (its source mentions `tools` and "<tool_call>", as Qwen2.5 / Qwen3 / Hermes templates
  do): `apply_chat_template(messages, tools=tools)`;
- fallback (every other template, the demo model's included): the messages are rewritten into plain ones that
  any template renders, in the same Hermes format — the tool list goes into the system message
  (orchestrator/api/tools_fallback.jinja), an assistant call becomes "<tool_call>\\n{...}\\n</tool_call>" text,
  and consecutive tool results become one user message of "<tool_response>\\n...\\n</tool_response>" blocks.
Either way the answer is parsed by orchestrator/api/tool_parser.py and constrained by constraints.py.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from orchestrator.api.errors import APIError

FALLBACK_TEMPLATE = Path(__file__).with_name("tools_fallback.jinja")


@lru_cache(maxsize=1)
def _fallback_template():
    import jinja2

    env = jinja2.Environment(keep_trailing_newline=False, trim_blocks=False, lstrip_blocks=False)
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env.from_string(FALLBACK_TEMPLATE.read_text())


def template_source(tok: Any) -> str:
    src = getattr(tok, "chat_template", None)
    if isinstance(src, dict):
        return "\n".join(str(v) for v in src.values())
    return src if isinstance(src, str) else ""


def native_tools(tok: Any) -> bool:
    src = template_source(tok)
    return "tools" in src and "<tool_call>" in src


def history(messages: list[Any]) -> list[dict]:
    """Request messages -> HF-style message dicts (arguments as objects, tool results named). Raises APIError."""
    out: list[dict] = []
    calls: dict[str, str] = {}  # tool_call id -> function name
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        tool_calls = getattr(m, "tool_calls", None)  # assistant messages only (typed per role at the edge)
        if tool_calls:
            tcs = []
            for j, tc in enumerate(tool_calls):
                where = f"messages.{i}.tool_calls.{j}"
                if tc.id in calls:
                    raise APIError(400, f"the tool call id '{tc.id}' is used twice", param=f"{where}.id",
                                   code="duplicate_tool_call_id")
                try:
                    args = json.loads(tc.function.arguments) if tc.function.arguments.strip() else {}
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise APIError(400, "function arguments must be a JSON object (as text)",
                                   param=f"{where}.function.arguments", code="invalid_value")
                calls[tc.id] = tc.function.name
                tcs.append({"id": tc.id, "type": "function",
                            "function": {"name": tc.function.name, "arguments": args}})
            msg["tool_calls"] = tcs
        if m.role == "tool":  # tool_call_id is required on tool messages (schemas.ToolMessage)
            if m.tool_call_id not in calls:
                raise APIError(400, f"tool_call_id '{m.tool_call_id}' matches no tool call of an earlier assistant "
                               "message", param=f"messages.{i}.tool_call_id", code="unknown_tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
            msg["name"] = calls[m.tool_call_id]
        out.append(msg)
    return out


def _call_text(tc: dict) -> str:
    body = {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
    return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"


def fallback_messages(msgs: list[dict], tools: list[dict] | None) -> list[dict]:
    """HF-style messages with tools -> plain {role, content} messages in the Hermes format."""
    out: list[dict] = []
    rest = msgs
    if tools:
        system = ""
        if msgs and msgs[0]["role"] == "system":
            system, rest = msgs[0]["content"], msgs[1:]
        out.append({"role": "system", "content": _fallback_template().render(system=system, tools=tools)})
    for m in rest:
        if m["role"] == "tool":
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m["content"] else []
            parts += [_call_text(tc) for tc in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
            continue
        out.append({"role": m["role"], "content": m["content"]})
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]


def render(tok: Any, messages: list[Any], tools: list[dict] | None) -> str:
    """Prompt text for the messages (validated) and the tools (OpenAI tool dicts, None = no tools this turn)."""
    msgs = history(messages)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)
    if uses_tools and native_tools(tok):
        try:
            return tok.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that rejects this history: the fallback renders it
            pass
    if uses_tools:
        msgs = fallback_messages(msgs, tools)
    try:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # no chat template: a plain transcript
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
