"""Request bodies of the OpenAI tools API and of `response_format` (pydantic, extra="forbid").

Shapes follow the OpenAI Chat Completions API: `tools=[{"type": "function", "function": {name, description,
parameters, strict}}]`, `tool_choice` "none" | "auto" | "required" | {"type": "function", "function": {"name"}},
assistant `tool_calls=[{id, type, function: {name, arguments}}]`, `response_format` text | json_object |
json_schema {name, description, schema, strict}. A missing or malformed field is a 400 that names it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def json_int(**constraints: Any) -> Any:
    """JSON Schema's "integer" (what the published schema says): an int, or a number with no fraction such as 8.0.
    The models are strict, so a string ("8"), a boolean or 8.5 is still a 400. (Constraints go before the
    validator, or pydantic writes them into the schema under their Python names.)"""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


JSONInt = json_int()

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and json_schema names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class FunctionDefinition(_Strict):
    name: str = Field(..., pattern=FUNCTION_NAME, description="a-z, A-Z, 0-9, _ and -, at most 64 characters")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None = no arguments
    strict: bool | None = None  # accepted; arguments are always grammar-constrained


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(..., min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(_Strict):
    name: str = Field(..., min_length=1, max_length=64)
    arguments: str = Field(..., json_schema_extra={"contentMediaType": "application/json",  # what the API returned
                                                     "contentSchema": {"type": "object"}},
                           description="the call's arguments: a JSON object, as text")
    parsed_arguments: Any = None  # the openai SDK sends its parse() result back; not used


class ToolCall(_Strict):
    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    index: JSONInt | None = None  # present in messages assembled from a stream by the SDK


class JSONSchemaFormat(_Strict):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat],
                           Field(discriminator="type")]
