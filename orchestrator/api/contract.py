"""The published OpenAPI schema (/openapi.json): what this server accepts and answers, so that a client generated
from it gets what the server does.

FastAPI derives most of it from the request models (orchestrator/api/schemas.py: strict types, unsupported knobs
as `const`, messages typed per role) and from each route's documented error statuses (errors.error_responses).
Here, when the app is built, the schema is finished with what only the running server knows:
- FastAPI's automatic 422 responses are dropped: validation errors are 400s with the error body;
- limits of this config: `max_tokens` / `max_completion_tokens` up to limits.max_tokens, at most limits.max_stop
  non-empty stop strings, at most limits.max_messages messages, prompt token ids below the vocabulary size and at
  most the prompt limit of them;
- what the engine can do: the mock engine has no grammar-constrained decoding, so with `engine: mock` the schema
  offers no tools and only the text response format (the server answers 400 to the others).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

CHAT, COMPLETION = "ChatCompletionRequest", "CompletionRequest"


def install(app: FastAPI, state: Any) -> None:
    """Serve `published_schema` as the app's /openapi.json (built once, on first use)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = published_schema(app, state)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def published_schema(app: FastAPI, state: Any) -> dict:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _drop_422(spec)
    schemas = spec.get("components", {}).get("schemas", {})
    _limits(schemas, state)
    if state.cfg.engine == "mock":
        _no_grammar(schemas)
    return spec


def _drop_422(spec: dict) -> None:
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _branch(prop: dict, type_: str) -> dict | None:
    """The `type_` branch of a property schema (itself, or one of its anyOf)."""
    if prop.get("type") == type_:
        return prop
    return next((b for b in prop.get("anyOf", []) if b.get("type") == type_), None)


def _limits(schemas: dict, state: Any) -> None:
    lim, ctx = state.cfg.limits, state.max_model_len
    max_prompt = min(lim.max_prompt_tokens or ctx - 1, ctx - 1)
    for name in (CHAT, COMPLETION):
        props = schemas.get(name, {}).get("properties", {})
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props and (b := _branch(props[key], "integer")) is not None:
                b["maximum"] = min(lim.max_tokens, ctx - 1)
        if "stop" in props:
            stop = props["stop"]
            text = _branch(stop, "string")
            many = _branch(stop, "array")
            if text is not None:
                text["minLength"] = 1
            if many is not None:
                many["maxItems"] = lim.max_stop
                many.setdefault("items", {})["minLength"] = 1
            if lim.max_stop == 0 and text is not None:
                stop["anyOf"] = [b for b in stop["anyOf"] if b is not text]
            stop["description"] = f"at most {lim.max_stop} non-empty stop strings"
    chat = schemas.get(CHAT, {}).get("properties", {})
    if "messages" in chat:
        chat["messages"]["maxItems"] = lim.max_messages
    prompt = schemas.get(COMPLETION, {}).get("properties", {}).get("prompt")
    if prompt is not None:
        for branch in prompt.get("anyOf", []):
            for ids in (branch, branch.get("items", {})):
                if ids.get("type") == "array" and ids.get("items", {}).get("type") == "integer":
                    ids["items"]["maximum"] = state.vocab_size - 1
                    ids["maxItems"] = max_prompt


def _no_grammar(schemas: dict) -> None:
    chat = schemas.get(CHAT, {}).get("properties", {})
    note = "engine: mock has no grammar-constrained decoding"
    chat.pop("tools", None)
    if "tool_choice" in chat:
        chat["tool_choice"] = {"anyOf": [{"const": "none"}, {"type": "null"}], "description": f"{note}: no tools"}
    if "response_format" in chat:
        chat["response_format"] = {"anyOf": [{"$ref": "#/components/schemas/TextFormat"}, {"type": "null"}],
                                   "description": f"{note}: text only"}
