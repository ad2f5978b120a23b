"""Request bodies of the HTTP API (pydantic, extra="forbid", strict: an unknown argument or a wrong JSON type is a
400, as OpenAI does; `max_tokens: "8"` is refused, not coerced).

The published OpenAPI schema is generated from these models, so it says what the server accepts:
- fields the OpenAI SDK may send but specfleet does not implement are accepted only at their neutral value
  (`n` 1, no logprobs, zero penalties, empty `logit_bias`) and the schema says so (`const`); any other value is a
  400 naming the field;
- chat messages are typed per role (a `tool` message requires `tool_call_id`, only `assistant` messages carry
  `tool_calls`); content is text (an `image_url` part is a 400 "image input is not supported");
- a lone UTF-16 surrogate anywhere in a body (`"\\ud800"`: valid JSON, not valid Unicode) is a 400 before anything
  runs or is stored.
Limits that depend on the server's config (max_tokens cap, stop count, token-id range) are added to the schema when
the app is built (orchestrator/api/contract.py). Tools and response_format: orchestrator/api/tool_schemas.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from orchestrator.api.tool_schemas import JSONInt, ResponseFormat, Tool, ToolCall, ToolChoice, json_int
from orchestrator.sessions import clean_text, unencodable

MAX_METADATA_KEYS = 32
PositiveInt = json_int(ge=1)
NonNegativeInt = json_int(ge=0)
Seed = json_int(ge=-(2**63), le=2**63 - 1)
BlockSize = json_int(ge=2, le=64)


# ---------------------------------------------------------------- text that is not Unicode
def surrogate_path(value: Any) -> str | None:
    """The dotted path of the first string (or key) holding a lone UTF-16 surrogate, or None (the path itself
    shows such a key with U+FFFD). JSON allows "\\ud800"; Python decodes it into a str that cannot be encoded as
    UTF-8 (tokenizers, SQLite and JSON responses then fail), so such text is refused at the edge."""
    found = _surrogate_path(value, "")
    return None if found is None else clean_text(found)


def _surrogate_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path or "body" if unencodable(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and unencodable(k):
                return sub
            found = _surrogate_path(v, sub)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_path(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Body(_Strict):
    """A whole request body: refused (400, code invalid_unicode) when any string in it is not valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = surrogate_path(data)
        if where:
            raise PydanticCustomError("invalid_unicode", "{where} holds a lone UTF-16 surrogate (e.g. \\ud800), which "
                                      "is not valid Unicode; send UTF-8 text", {"where": where})
        return data


def _only(tp: Any, value: Any, message: str, schema: dict | None = None) -> Any:
    """The type of an OpenAI field accepted only at its neutral `value` (or null): other values are a 400 with
    `message`, and the published schema says so."""
    def check(v):
        if v is not None and v != value:
            raise ValueError(message)
        return v
    shown = "{}" if value == {} else repr(value).lower() if isinstance(value, bool) else repr(value)
    return Annotated[tp, AfterValidator(check), WithJsonSchema(
        {"anyOf": [schema or {"const": value}, {"type": "null"}],
         "description": f"{message}; accepted: {shown} or null"})]


def _refuse_images(v: Any) -> Any:
    if isinstance(v, list):
        for part in v:
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                raise ValueError("image input is not supported (text-only models)")
            if isinstance(part, dict) and part.get("type") in ("input_audio", "file"):
                raise ValueError(f"{part['type']} input is not supported (text only)")
    return v


class SpecRequest(_Strict):
    """specfleet extension (send with the SDK's `extra_body`): force speculation on/off or a block size."""

    enabled: bool = True
    block_size: BlockSize | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = Annotated[Union[str, list[TextPart]], BeforeValidator(_refuse_images)]


class _Message(_Strict):
    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(p.text for p in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = Field(None, max_length=256)


class UserMessage(_Message):
    role: Literal["user"]
    content: Content
    name: str | None = Field(None, max_length=256)


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # ids unique, arguments a JSON object (orchestrator/api/chat_prompt.py)
    # what the openai SDK sends back when a client appends a returned message to the history unchanged
    refusal: str | None = None
    annotations: list[Any] | None = None
    parsed: Any = None  # the SDK's parse() result; not used
    audio: None = None
    function_call: None = None  # the deprecated single function call: use tool_calls


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(..., min_length=1, max_length=256,
                              description="the id of the assistant tool call this message answers (an earlier one)")


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]

OnlyOne = _only(JSONInt | None, 1, "only n=1 is supported")
NoPenalty = _only(float | None, 0, "presence/frequency penalties are not supported (send 0 or omit)")
NoLogitBias = _only(dict[str, float] | None, {}, "logit_bias is not supported", {"type": "object", "maxProperties": 0})
NoChatLogprobs = _only(bool | None, False, "logprobs are not supported")
NoLogprobs = _only(JSONInt | None, 0, "logprobs are not supported")
NoSuffix = _only(str | None, "", "suffix is not supported")
OnlyOneBest = _only(JSONInt | None, 1, "only best_of=1 is supported")


class _Sampling(_Body):
    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: NonNegativeInt | None = None  # extension
    n: OnlyOne = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: NoPenalty = None
    frequency_penalty: NoPenalty = None
    logit_bias: NoLogitBias = None
    ignore_eos: bool = False  # extension
    spec: SpecRequest | None = None  # extension

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: NoChatLogprobs = None
    top_logprobs: Annotated[JSONInt | None, WithJsonSchema(
        {"type": "null", "description": "needs logprobs: true, which is not supported"})] = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v):
        if v is not None:
            raise ValueError("top_logprobs needs logprobs: true, and logprobs are not supported")
        return v


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {
    "description": "a non-empty string, a non-empty list of token ids, or a one-element list of either "
                   "(one prompt per request)",
    "anyOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS,
              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
              {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1}]}


class CompletionRequest(_Sampling):
    # checked in orchestrator/api/openai.py (empty, several prompts, ids out of range: a 400 that says which)
    prompt: Annotated[Union[str, list[NonNegativeInt], list[str], list[list[NonNegativeInt]]],
                      WithJsonSchema(PROMPT_SCHEMA)]
    echo: bool = False
    logprobs: NoLogprobs = None
    suffix: NoSuffix = None
    best_of: OnlyOneBest = None


MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Union[Annotated[str, Field(max_length=512)], JSONInt, float, bool, None]


class SessionCreate(_Body):
    role: str | None = Field(None, max_length=128, description="agent role, e.g. planner / coder / reviewer")
    team: str | None = Field(None, max_length=128, description="team / group id")
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=MAX_METADATA_KEYS,
        description=f"at most {MAX_METADATA_KEYS} keys of at most 64 characters; strings of at most 512")
