"""The in-process serving stack the structured-output benchmarks drive: the demo target (and its DFlash drafter)
in a real engine, one ReplicaCore, the FastAPI app over a LocalBackend (no Ray, no sockets: the openai SDK talks
to it through httpx's ASGI transport)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def demo_engine(spec: bool = True, dtype: str = "float32", max_num_seqs: int = 16):
    """(LLMEngine over SmolLM2-135M-Instruct [+ the demo DFlash drafter], seconds to load)."""
    from workers import hub
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    drafter = str(hub.default_drafter_path()) if spec else None
    eng = LLMEngine(EngineConfig(model=str(hub.ensure_model("smollm2")), drafter=drafter, dtype=dtype, device="cpu",
                                 max_num_seqs=max_num_seqs, max_model_len=4096))
    return eng, time.perf_counter() - t0


def inproc_server(spec: bool = True, dtype: str = "float32", max_num_seqs: int = 16):
    """(ASGI app, ReplicaCore, model load seconds)."""
    from orchestrator.api.server import create_app
    from orchestrator.api.state import LocalBackend, ServerState
    from orchestrator.config import ServeConfig
    from orchestrator.replica import ReplicaCore
    from workers.engine.async_engine import AsyncLLMEngine

    eng, load_s = demo_engine(spec, dtype, max_num_seqs)
    cfg = ServeConfig.model_validate({
        "engine": "mock", "persistence": {"sqlite_path": str(Path(tempfile.mkdtemp()) / "sessions.sqlite")},
        "auth": {"keys": ["key-a"], "keys_env": None},
        "limits": {"per_key_concurrency": 256, "per_key_queue": 4096, "max_tokens": 4096},
    })
    core = ReplicaCore(AsyncLLMEngine(eng), cfg.fleet()[0], replica_id="r0", rank=0,
                       block_size=eng.max_block if spec else 16, spec_available=spec)
    state = ServerState.create(cfg, LocalBackend([core]), tokenizer=eng.tokenizer, max_model_len=eng.max_model_len)
    return create_app(state), core, load_s
