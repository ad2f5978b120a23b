"""EngineClient: the engine surface the serving layer programs against (torch-free).

Implemented by workers.engine.async_engine.AsyncLLMEngine (the engine in this process),
cluster.runtime.replica_group.ReplicaGroup (tensor-parallel ranks as Ray actors; rank 0 runs an
AsyncLLMEngine) and orchestrator.mock_engine.MockEngine (torch-free, for serving tests).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

from workers.engine.params import EngineStats, RequestOutput, SamplingParams, SpecParams


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Any  # HF-like tokenizer (encode / decode / apply_chat_template), or None
    max_model_len: int | None
    eos_token_ids: list[int]

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 spec: SpecParams | None = None, tags: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Raises InvalidRequest / NoCapacity on the first ``__anext__``,
        before any token; a failure later ends the stream with finish_reason "error"."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def check_health(self) -> None:
        """Raises when the engine cannot serve (loop dead, wedged, restarting)."""
        ...

    async def shutdown(self) -> None: ...

