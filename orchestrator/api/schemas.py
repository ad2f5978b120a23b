"""Request bodies of the HTTP API (pydantic, extra="forbid": an unknown argument is a 400, as OpenAI does).

Fields the OpenAI SDK may send but specfleet does not implement are accepted only at their neutral value
(n=1, no logprobs, zero penalties) and rejected with a clear 400 otherwise. Tools and response_format:
orchestrator/api/tool_schemas.py.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.api.tool_schemas import ResponseFormat, Tool, ToolCall, ToolChoice

MAX_METADATA_KEYS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecRequest(_Strict):
    """specfleet extension (send with the SDK's `extra_body`): force speculation on/off or a block size."""

    enabled: bool = True
    block_size: int | None = Field(None, ge=2, le=64)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # assistant messages (checked in orchestrator/api/chat_prompt.py)
    # what the openai SDK sends back when a client appends a returned message to the history unchanged
    refusal: str | None = None
    annotations: list[Any] | None = None
    parsed: Any = None  # the SDK's parse() result; not used
    audio: None = None
    function_call: None = None  # the deprecated single function call: use tool_calls

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # extension
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # extension
    spec: SpecRequest | None = None  # extension

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("presence/frequency penalties are not supported (send 0 or omit)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class SessionCreate(_Strict):
    role: str | None = Field(None, max_length=128, description="agent role, e.g. planner / coder / reviewer")
    team: str | None = Field(None, max_length=128, description="team / group id")
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, v):
        if len(v) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        for k, x in v.items():
            if len(k) > 64 or (isinstance(x, str) and len(x) > 512):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v
