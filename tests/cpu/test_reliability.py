"""Reliability under client misbehaviour and bursts (issue 8), over real HTTP (uvicorn in a thread,
mock engine): a client that disconnects mid-stream frees its engine slot, KV reservation and per-key
slot, and its turn is still recorded; a burst far beyond the per-key limits gets only 200s and 429s
with Retry-After (no 5xx, no hang) and leaves nothing held.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from tests.helpers.serving import inproc_app, mock_config

MODEL = "specfleet-demo"
AUTH = {"authorization": "Bearer key-a"}


def chat(content: str = "hello", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


class Server:
    """The in-process app (mock replicas) behind a real uvicorn socket."""

    def __init__(self, cfg):
        self.app, self.state, self.cores = inproc_app(cfg)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def idle(self) -> bool:
        st = self.state
        engines = [c.engine.stats() for c in self.cores]
        return (st.in_flight == 0 and st.gate.waiting == 0
                and all(e.num_running == 0 and e.num_waiting == 0 and e.kv_free_tokens == e.kv_total_tokens
                        for e in engines))


async def wait_until(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def test_client_disconnect_mid_stream_frees_everything(tmp_path):
    cfg = mock_config(tmp_path, replicas=[{"mock": {"step_ms": 20, "acceptance": 0.3}}],
                      limits={"per_key_concurrency": 1, "per_key_queue": 0})
    with Server(cfg) as srv:
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as c:
            sid = (await c.post("/v1/sessions", json={"role": "coder"})).json()["id"]
            got = 0
            async with c.stream("POST", "/v1/chat/completions", headers={"x-session-id": sid},
                                json=chat(max_tokens=2000, stream=True)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    got += line.startswith("data: ")
                    if got >= 5:
                        break  # leaving the block closes the connection mid-stream
            # the server notices, aborts the request in the engine and releases the per-key slot
            assert await wait_until(srv.idle), (srv.state.in_flight, [c.engine.stats() for c in srv.cores])
            # the only per-key slot is free again: a new request is served (not 429)
            r = await c.post("/v1/chat/completions", headers={"x-session-id": sid}, json=chat(max_tokens=4))
            assert r.status_code == 200, r.text
            s = (await c.get(f"/v1/sessions/{sid}")).json()
    # both turns are in the registry; the cut one as "abort", with the tokens it had produced
    assert s["turns"] == 2
    cut, done = s["replica_history"]
    assert cut["finish_reason"] == "abort" and 0 < cut["completion_tokens"] < 2000
    assert done["finish_reason"] == "length" and done["completion_tokens"] == 4


async def test_burst_beyond_limits_is_only_200_or_429(tmp_path):
    cfg = mock_config(tmp_path, replicas=[{"count": 2, "max_num_seqs": 4, "mock": {"step_ms": 5}}],
                      limits={"per_key_concurrency": 4, "per_key_queue": 4, "queue_timeout_s": 5.0})
    with Server(cfg) as srv:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=60, limits=limits) as c:
            async def one(i):
                body = chat(f"burst {i}", max_tokens=24, stream=i % 2 == 0)
                r = await c.post("/v1/chat/completions", json=body)
                return r.status_code, r.headers.get("retry-after"), r.text, body["stream"]

            results = await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(60)]), 120)
            codes = [code for code, *_ in results]
            assert set(codes) <= {200, 429}, [(c_, t[:200]) for c_, _, t, _ in results if c_ not in (200, 429)]
            assert codes.count(200) >= 8 and codes.count(429) >= 1
            for code, retry, text, stream in results:
                if code == 429:
                    assert int(retry) >= 1 and '"rate_limit_error"' in text
                elif stream:  # a complete stream, no error event
                    events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
                    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
                else:
                    assert '"finish_reason":"length"' in text.replace(" ", "")
            assert await wait_until(srv.idle)
            # another key is unaffected, and this key is served again once the burst is over
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=4))
            assert r.status_code == 200
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=4),
                             headers={"authorization": "Bearer key-b"})
            assert r.status_code == 200
