"""Helpers for serving tests: an in-process app (no Ray) over mock replicas, and a real Serve instance.

Also meant for the reliability tests: `inproc_app(cfg)` and `serve_instance(cfg)` both take a ServeConfig.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from orchestrator.api.server import create_app
from orchestrator.api.state import LocalBackend, ServerState
from orchestrator.config import ServeConfig
from orchestrator.mock_engine import MockEngine
from orchestrator.replica import ReplicaCore


def mock_config(tmp_path, **over) -> ServeConfig:
    data = {"engine": "mock", "persistence": {"sqlite_path": str(tmp_path / "sessions.sqlite")},
            "auth": {"keys": ["key-a", "key-b"], "keys_env": None}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return ServeConfig.model_validate(data)


def inproc_app(cfg: ServeConfig):
    """(FastAPI app, state, replica cores) with one ReplicaCore per fleet entry, round-robin."""
    cores = []
    for rank, spec in enumerate(cfg.fleet()):
        drafter = spec.drafter if spec.drafter is not None else cfg.model.drafter
        has = drafter not in (None, "none", "")
        eng = MockEngine(spec.mock, block_size=spec.block_size or cfg.model.block_size,
                         max_num_seqs=spec.max_num_seqs, speculative=has)
        cores.append(ReplicaCore(eng, spec, replica_id=f"r{rank}", rank=rank,
                                 block_size=spec.block_size or cfg.model.block_size, spec_available=has,
                                 telemetry=eng.telemetry, weights=cfg.router.weights))
    state = ServerState.create(cfg, LocalBackend(cores))
    return create_app(state), state, cores


def asgi_client(app, key: str | None = "key-a") -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


def start_serve(cfg_path, log_path, url: str, env: dict | None = None, timeout_s: float = 240.0) -> subprocess.Popen:
    """`specfleet serve cfg_path` as a child process (stdout and stderr appended to log_path), returned once url
    answers /health; if it does not within timeout_s, the process is killed and an AssertionError carries the
    log's tail."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, timeout_s=timeout_s)
    except TimeoutError:
        proc.kill()
        raise AssertionError(Path(log_path).read_text()[-3000:])
    return proc
