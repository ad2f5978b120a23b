"""Tool calls in the model's output, Hermes / Qwen format, as OpenAI `tool_calls` (whole, or as stream deltas).

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the blocks is the message content; whitespace next to a block is dropped. A block becomes a tool
call when it is complete and its JSON is {"name": <one of the request's tools>, "arguments": <object>};
anything else stays text, so a broken call is never reported as a call.

Streaming (`ToolCallStream.feed`): content is released as it arrives, holding back only trailing whitespace
and a suffix that could start "<tool_call>". With `incremental` (the output is grammar-constrained, so a
block that has begun is a call), a call's first delta (index, id, type, name, arguments "") goes out as soon
as its name is complete and the argument text follows in fragments, holding back a suffix that could be the
block's end ("}" + whitespace + "</tool_call>"); without it a call goes out whole when its block closes. The
official SDK concatenates string fields, so `id`, `type` and `name` are sent once per call.
`parse_tool_calls` runs the same machine over a whole text, so streamed and non-streamed results agree.
The grammar (orchestrator/api/constraints.py) emits `CALL_PREFIX + name + ARGS_PREFIX + arguments +
CALL_SUFFIX`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_PREFIX = '<tool_call>\n{"name": "'
ARGS_PREFIX = '", "arguments": '
CALL_SUFFIX = "}\n</tool_call>"
CALL_SEPARATOR = "\n"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# a suffix of the argument text that may be the block's end: "}" ws* and a prefix of "</tool_call>"
_END = re.compile(r"\}\s*(?:<(?:/(?:t(?:o(?:o(?:l(?:_(?:c(?:a(?:l(?:l)?)?)?)?)?)?)?)?)?)?)?$")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _json_string(raw: str) -> str | None:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return None


def _split_block(body: str) -> tuple[str, str] | None:
    """Block text in the grammar's layout -> (name, argument text), or None."""
    m = _HEAD.match(body)
    if m is None:
        return None
    rest = body[m.end():].rstrip()
    if not rest.endswith("}"):
        return None
    name = _json_string(m.group(1))
    return None if name is None else (name, rest[:-1].rstrip())


def parse_block(body: str, names: set[str]) -> tuple[str, str] | None:
    """Text between <tool_call> and </tool_call> -> (name, arguments JSON text) when it is a call of ours."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    split = _split_block(body)
    if split is not None:  # keep the model's own argument text when it is exactly the arguments object
        try:
            if json.loads(split[1]) == args:
                return obj["name"], split[1]
        except ValueError:
            pass
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ToolCallStream:
    """Feed text deltas; get {"content": str} and {"tool_call": <OpenAI delta entry>} events."""

    names: set[str]
    incremental: bool = False
    calls: list[ParsedCall] = field(default_factory=list)
    content_parts: list[str] = field(default_factory=list)
    _buf: str = ""  # unreleased text
    _in_call: bool = False
    _after_call: bool = False  # a block ended and no content has been released since
    _ws: str = ""  # trailing whitespace of the content, held
    _id: str | None = None  # id of the call being streamed (its first delta went out)
    _name: str = ""
    _sent: int = 0  # characters of its argument text already sent

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        out: list[dict] = []
        while True:
            if not self._in_call:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    self._content(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:i], out)
                self._ws = ""  # whitespace before a block is dropped
                self._buf = self._buf[i + len(OPEN):]
                self._in_call, self._id, self._sent = True, None, 0
                continue
            j = self._buf.find(CLOSE)
            if j < 0:
                if self.incremental:
                    self._stream(out)
                return out
            self._finish(self._buf[:j], out)
            self._buf = self._buf[j + len(CLOSE):]
            self._in_call = False

    def close(self) -> list[dict]:
        """End of the output. An unfinished block stays content unless part of it was streamed as a call."""
        out: list[dict] = []
        if self._in_call and self._id is None:
            self._content(OPEN + self._buf, out)
        elif not self._in_call:
            self._content(self._buf, out)
        if not self.calls and self._id is None and self._ws:
            self.content_parts.append(self._ws)
            out.append({"content": self._ws})
        self._buf, self._ws = "", ""
        return out

    @property
    def content(self) -> str | None:
        return "".join(self.content_parts) or None

    @property
    def streamed_partial_call(self) -> bool:
        """A call was begun on the stream and its block never closed (the output was cut)."""
        return self._in_call and self._id is not None

    # ---- internals ----
    def _content(self, text: str, out: list[dict]) -> None:
        if self._after_call:
            text = text.lstrip()
        if not text:
            return
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        release = self._ws + body
        self._ws = text[len(body):]
        self._after_call = False
        self.content_parts.append(release)
        out.append({"content": release})

    def _index(self) -> int:
        return len(self.calls)

    def _stream(self, out: list[dict]) -> None:
        m = _HEAD.match(self._buf)
        if m is None:
            return
        if self._id is None:
            name = _json_string(m.group(1))
            if name is None or name not in self.names:
                return  # decided when the block closes
            self._id, self._name = new_call_id(), name
            out.append({"tool_call": {"index": self._index(), "id": self._id, "type": "function",
                                      "function": {"name": name, "arguments": ""}}})
        args = self._buf[m.end():]
        end = _END.search(args)
        upto = end.start() if end else len(args.rstrip())
        if upto > self._sent:
            out.append({"tool_call": {"index": self._index(), "function": {"arguments": args[self._sent: upto]}}})
            self._sent = upto

    def _finish(self, body: str, out: list[dict]) -> None:
        if self._id is not None:  # streamed: the rest of the argument text
            split = _split_block(body)
            args = split[1] if split else body[_HEAD.match(body).end():]
            if len(args) > self._sent:
                out.append({"tool_call": {"index": self._index(), "function": {"arguments": args[self._sent:]}}})
            self.calls.append(ParsedCall(self._id, self._name, args))
            self._id, self._after_call = None, True
            return
        got = parse_block(body, self.names)
        if got is None:  # not a call of ours: it was text
            self._content(OPEN + body + CLOSE, out)
            return
        call = ParsedCall(new_call_id(), *got)
        out.append({"tool_call": {"index": self._index(), **call.to_openai()}})
        self.calls.append(call)
        self._after_call = True


def parse_tool_calls(text: str, names: set[str], incremental: bool = False) -> tuple[str | None, list[ParsedCall]]:
    """Whole output -> (content or None, complete tool calls). With `incremental` (grammar-constrained output,
    as streamed), a call cut off by max_tokens is dropped rather than returned as content text."""
    s = ToolCallStream(names, incremental=incremental)
    s.feed(text)
    s.close()
    return s.content, s.calls
