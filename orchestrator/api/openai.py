"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (plain and SSE), /v1/models.

Every completion response carries `x-specfleet-replica`, `x-specfleet-route` (the router's reason) and
`x-specfleet-spec` (block size or "off"); the session comes in through `x-session-id`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from orchestrator.api.deps import get_state, owner_of
from orchestrator.api.errors import APIError, error_responses
from orchestrator.api.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from orchestrator.api.state import ServerState
from orchestrator.api.tools import ChatDeltas, ChatPlan, chat_message, invalid_output, output_problem, plan_chat
from orchestrator.api.turns import Turn, TurnRequest
from orchestrator.replica import ErrorKind

router = APIRouter()
RETRIES_NON_STREAM = 2


# ---------------------------------------------------------------- models
def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "specfleet"}


MODEL_ERRORS = error_responses(400, 401)
COMPLETION_ERRORS = error_responses(400, 401, 404, 413, 429, 503)
COMPLETION_OK = {200: {"description": "the completion (application/json), or with `stream: true` server-sent events: "
                       "`data: {chunk}` lines, `data: [DONE]` last (a failure after the first token: one "
                       "`data: {\"error\": {...}}` event instead)",
                       "content": {"application/json": {"schema": {"type": "object"}},
                                   "text/event-stream": {"schema": {"type": "string"}}}}}


@router.get("/v1/models", responses=MODEL_ERRORS)
async def list_models(state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    return {"object": "list", "data": [_model_card(n) for n in state.cfg.model.served_names()]}


@router.get("/v1/models/{model_id:path}", responses=error_responses(400, 401, 404))
async def get_model(model_id: str, state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    if model_id not in state.cfg.model.served_names():
        raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(model_id)


# ---------------------------------------------------------------- request preparation
def _check_model(state: ServerState, body: _Sampling) -> None:
    if body.model not in state.cfg.model.served_names():
        raise APIError(404, f"the model '{body.model}' does not exist; available: "
                       f"{', '.join(state.cfg.model.served_names())}", param="model", code="model_not_found")


def _session_and_tags(state: ServerState, owner: str, sid: str | None, role: str | None, team: str | None):
    session = None
    if sid:
        session = state.registry.exists(owner, sid)
        if session is None:  # unknown, deleted, or another key's: indistinguishable on purpose
            raise APIError(404, f"session '{sid}' not found", param="x-session-id", code="session_not_found")
        role, team = session["role"] or role, session["team"] or team
    tags = {k: v for k, v in (("session", sid), ("role", role), ("team", team)) if v}
    return session, tags


def _sampling(state: ServerState, body: _Sampling, max_tokens: int | None, n_prompt: int) -> dict:
    lim, ctx = state.cfg.limits, state.max_model_len
    max_prompt = min(lim.max_prompt_tokens or ctx - 1, ctx - 1)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if n_prompt > max_prompt:
        raise APIError(400, f"the prompt has {n_prompt} tokens; the limit is {max_prompt}",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > lim.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} exceeds the server limit of {lim.max_tokens}",
                       param="max_tokens", code="max_tokens_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(lim.default_max_tokens, ctx - n_prompt))
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"this model's maximum context length is {ctx} tokens; the request asks for "
                       f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    stop = body.stop_list()
    if len(stop) > lim.max_stop:
        raise APIError(400, f"at most {lim.max_stop} stop sequences are allowed, got {len(stop)}", param="stop",
                       code="too_many_stop_sequences")
    if any(not s for s in stop):
        raise APIError(400, "stop sequences must be non-empty", param="stop", code="invalid_stop")
    return {"temperature": 0.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
            "max_tokens": max_tokens, "stop": stop, "seed": body.seed, "ignore_eos": body.ignore_eos}


def _spec(body: _Sampling) -> dict | None:
    if body.spec is None:
        return None
    return {"enabled": body.spec.enabled, "block_size": body.spec.block_size}


async def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], ChatPlan]:
    if len(body.messages) > state.cfg.limits.max_messages:
        raise APIError(400, f"at most {state.cfg.limits.max_messages} messages are allowed", param="messages",
                       code="too_many_messages")
    tok = state.tokenizer

    def encode() -> tuple[list[int], ChatPlan]:
        plan = plan_chat(tok, body)  # tools, response_format, history checks; the template applied
        return list(tok.encode(plan.prompt, add_special_tokens=False)), plan

    return await asyncio.to_thread(encode)


async def _completion_prompt(state: ServerState, body: CompletionRequest) -> list[int]:
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt", code="invalid_prompt")
        p = p[0]
    if isinstance(p, str):
        return await asyncio.to_thread(lambda: list(state.tokenizer.encode(p)))
    vocab = state.vocab_size
    if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in p):
        raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt",
                       code="invalid_prompt")
    return list(p)


def _headers(turn: Turn) -> dict[str, str]:
    res = turn.result
    spec = res.spec or {}
    h = {"x-specfleet-replica": res.replica or "", "x-specfleet-route": res.route or "",
         "x-specfleet-spec": (f"block={spec.get('block_size')}" if spec.get("enabled") else "off")}
    if not turn.state.behind_proxy:  # Ray Serve's proxy sets x-request-id itself (one header, one value)
        h["x-request-id"] = turn.req.client_request_id or turn.req.request_id
    if turn.session_id:
        h["x-session-id"] = turn.session_id
    return h


def _usage(turn: Turn) -> dict:
    p, c = len(turn.req.prompt_token_ids), turn.result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _serve(state: ServerState, owner: str, body: _Sampling, prompt: list[int], max_tokens: int | None,
                 sid: str | None, role: str | None, team: str | None, endpoint: str, chat: bool,
                 plan: ChatPlan | None = None, client_request_id: str | None = None):
    _check_model(state, body)
    session, tags = _session_and_tags(state, owner, sid, role, team)
    sampling = _sampling(state, body, max_tokens, len(prompt))
    if plan is not None and plan.constraint is not None:
        sampling["structured"] = plan.constraint
    extra: dict[str, Any] = {"client_request_id": client_request_id}
    if plan is not None:
        extra.update(constrained=(plan.constraint or {}).get("kind"), tool_names=frozenset(plan.tool_names))
    make = lambda: Turn(state, TurnRequest(owner, endpoint, prompt, sampling, _spec(body), session, tags, **extra))
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if not body.stream:
        for attempt in range(RETRIES_NON_STREAM + 1):
            turn = make()
            await turn.start()
            error = kind = None
            async for item in turn.items():
                if item["type"] == "error":
                    error, kind = item["message"], item["kind"]
            if error is None:
                break
            if kind != ErrorKind.REPLICA_FAILED or attempt == RETRIES_NON_STREAM:  # nothing sent yet: retry
                raise APIError(503, error, code="engine_error", type="server_error",
                               headers={"Retry-After": str(state.cfg.limits.retry_after_s), **_headers(turn)})
        text, fr = "".join(turn.result.text), _finish(turn.result.finish_reason)
        if chat:
            message, fr, _ = chat_message(plan or ChatPlan(prompt=""), text, fr)
            choice = {"index": 0, "message": message, "finish_reason": fr, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": fr, "logprobs": None}
        if not chat and getattr(body, "echo", False):
            choice["text"] = state.tokenizer.decode(prompt) + text
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": body.model, "choices": [choice], "usage": _usage(turn), "system_fingerprint": None}
        return JSONResponse(out, headers=_headers(turn))

    turn = make()
    await turn.start()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    deltas = ChatDeltas(plan or ChatPlan(prompt="")) if chat else None

    def chunk(delta: str | dict | None, finish: str | None) -> str:
        if chat:
            d: dict[str, Any] = delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
            ch = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            ch = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [ch]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        try:
            async for ev in _events():
                yield ev
        finally:
            await turn.close()

    async def _events():
        if chat:
            yield chunk(deltas.first_delta, None)
        elif getattr(body, "echo", False):
            yield chunk(state.tokenizer.decode(prompt), None)
        async for item in turn.items():
            if item["type"] == "delta":
                if item.get("text"):
                    if chat:
                        for d in deltas.feed(item["text"]):
                            yield chunk(d, None)
                    else:
                        yield chunk(item["text"], None)
            elif item["type"] == "error":
                yield _error_event(item["message"], "engine_error")
                return
        fr = _finish(turn.result.finish_reason)
        if chat:
            for d in deltas.close():
                yield chunk(d, None)
            fr = deltas.finish_reason(fr)
            problem = output_problem(deltas.plan, "".join(deltas.text), fr) if not deltas.tool_calls else None
            if problem:
                yield _error_event(invalid_output(problem).message, "structured_output_invalid")
                return
        yield chunk(None, fr)
        if include_usage:
            data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                    "usage": _usage(turn)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(turn.close),
                             headers={**_headers(turn), "cache-control": "no-cache"})


def _error_event(message: str, code: str) -> str:
    err = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(err)}\n\n"


SESSION_HEADER = Header(None, max_length=256, description="a session id from POST /v1/sessions (404 when "
                        "unknown or another key's); its role and team tag the request")
ROLE_HEADER = Header(None, max_length=128, description="agent role tag of a request without a session")
TEAM_HEADER = Header(None, max_length=128, description="team tag of a request without a session")
REQUEST_ID_HEADER = Header(None, max_length=256, description="echoed as the x-request-id response header "
                           "(one is made up when absent)")


@router.post("/v1/chat/completions", responses={**COMPLETION_OK, **COMPLETION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, state: ServerState = Depends(get_state),
                           owner: str = Depends(owner_of), x_session_id: str | None = SESSION_HEADER,
                           x_agent_role: str | None = ROLE_HEADER, x_team_id: str | None = TEAM_HEADER,
                           x_request_id: str | None = REQUEST_ID_HEADER):
    _check_model(state, body)
    prompt, plan = await _chat_prompt(state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _serve(state, owner, body, prompt, max_tokens, x_session_id, x_agent_role, x_team_id,
                        "chat", chat=True, plan=plan, client_request_id=x_request_id)


@router.post("/v1/completions", responses={**COMPLETION_OK, **COMPLETION_ERRORS})
async def completions(body: CompletionRequest, state: ServerState = Depends(get_state),
                      owner: str = Depends(owner_of), x_session_id: str | None = SESSION_HEADER,
                      x_agent_role: str | None = ROLE_HEADER, x_team_id: str | None = TEAM_HEADER,
                      x_request_id: str | None = REQUEST_ID_HEADER):
    _check_model(state, body)
    prompt = await _completion_prompt(state, body)
    return await _serve(state, owner, body, prompt, body.max_tokens, x_session_id, x_agent_role, x_team_id,
                        "completions", chat=False, client_request_id=x_request_id)
