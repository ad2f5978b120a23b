"""Structured-output constraints -> compiled grammars (xgrammar), one compiler (and cache) per engine.

A constraint (workers.engine.params.StructuredSpec) is `kind` + `spec` text:
  json_object      any JSON object
  json_schema      JSON text of a schema (property order kept: the output follows it)
  structural_tag   JSON text of an xgrammar structural tag (tool calls, orchestrator/api/constraints.py)
  regex / ebnf     a regular expression / a GBNF grammar
Compiling is 7-17 ms for a new schema on the 2-core CPU and 0.01 ms on a cache hit (docs/structured.md); the
async engine compiles before the request reaches the engine thread, so the step loop only sees cache hits.
"""
from __future__ import annotations

import json
from typing import Any

from workers.engine.params import InvalidRequest, StructuredSpec

MAX_WHITESPACE = 16  # consecutive whitespace characters inside constrained JSON (no endless newlines)
CACHE_BYTES = 256 << 20


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], threads: int = 1):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True,
                                            cache_limit_bytes=CACHE_BYTES)
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        # special tokens that are not stop tokens never belong in constrained output (xgrammar's mask lets an
        # empty-decoding special token through in a final state, and accept_token then refuses it)
        self.never = sorted(t for t in special - set(self.stop_token_ids) if 0 <= t < vocab_size)

    def compile(self, spec: StructuredSpec) -> Any:
        """-> xgrammar CompiledGrammar. Raises InvalidRequest (naming spec.param) when it cannot be compiled."""
        try:  # xgrammar's compiler is thread-safe (the async engine compiles from worker threads)
            return self._compile(spec)
        except InvalidRequest:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors with the reason
            where = spec.param or "the structured-output constraint"
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if "] " in reason and reason.startswith("["):
                reason = reason.split("] ", 1)[1]
            raise InvalidRequest(f"{where} cannot be enforced: {reason}", param=spec.param) from None

    def _compile(self, spec: StructuredSpec) -> Any:
        c = self.compiler
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', strict_mode=False, max_whitespace_cnt=MAX_WHITESPACE)
        if spec.kind == "json_schema":
            json.loads(spec.spec)
            return c.compile_json_schema(spec.spec, strict_mode=True, max_whitespace_cnt=MAX_WHITESPACE)
        if spec.kind == "structural_tag":
            return c.compile_structural_tag(spec.spec)
        if spec.kind == "regex":
            return c.compile_regex(spec.spec)
        if spec.kind == "ebnf":
            return c.compile_grammar(spec.spec)
        raise InvalidRequest(f"unknown structured-output kind {spec.kind!r}", param=spec.param)

    def matcher(self, spec: StructuredSpec) -> Any:
        return self.xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=self.stop_token_ids)
