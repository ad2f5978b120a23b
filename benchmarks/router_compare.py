"""Router comparison on the real serving stack: the same trace, the same replicas, one run per policy.

For each policy (specfleet, pow2, consistent_hash) it starts `specfleet serve` with the given
ServeConfig (router.policy overridden, loopback only), replays the trace (benchmarks/workload.py)
through the OpenAI API with streaming — sessions opened with POST /v1/sessions (role, team), turns
sent with x-session-id, each turn's prompt = the session's whole conversation so far — and records
per request: arrival, first token, end, tokens, HTTP status, the x-specfleet-replica / -route /
-spec headers; then per-turn acceptance from GET /v1/sessions/{id}. Runs are bounded by
--duration-s (sessions not started by then are skipped; in-flight turns are allowed to finish).

    python -m benchmarks.router_compare --config benchmarks/configs/cpu_fleet.yaml \
        --trace runs/trace.jsonl --concurrency 6 --duration-s 150 --out runs/compare
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks.simulator import summarize
from benchmarks.workload import load

POLICIES = ("specfleet", "pow2", "consistent_hash")


@dataclass
class Measured:
    session: str
    team: str
    role: str
    turn: int
    t_arrive: float
    t_first: float | None = None
    t_done: float | None = None
    generated: int = 0
    prompt_tokens: int = 0
    status: int = 0
    replica: str = ""
    reason: str = ""
    spec: str = ""
    server_session: str = ""
    tau: float | None = None
    spec_passes: int = 0  # filled from the session's history: passes of speculative turns
    spec_tokens: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)


async def _turn(client: httpx.AsyncClient, model: str, sid: str, messages: list[dict], max_tokens: int,
                rec: Measured) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    text = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": sid}) as resp:
            rec.status = resp.status_code
            rec.replica = resp.headers.get("x-specfleet-replica", "")
            rec.reason = resp.headers.get("x-specfleet-route", "")
            rec.spec = resp.headers.get("x-specfleet-spec", "")
            if resp.status_code != 200:
                rec.error = (await resp.aread()).decode(errors="replace")[:300]
                rec.t_done = time.perf_counter()
                return ""
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                for ch in d.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        if rec.t_first is None:
                            rec.t_first = time.perf_counter()
                if d.get("usage"):
                    rec.generated = d["usage"]["completion_tokens"]
                    rec.prompt_tokens = d["usage"]["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.status, rec.error = 599, f"{type(exc).__name__}: {exc}"[:300]
    rec.t_done = time.perf_counter()
    if rec.status == 200 and rec.t_first is None:  # an empty answer: first token = end
        rec.t_first = rec.t_done
    return "".join(text)


async def sample_metrics(client: httpx.AsyncClient, t0: float, out: list, period_s: float = 2.0) -> None:
    """Per-replica KV headroom and queue gauges from /metrics, every period_s (headroom-over-time plot)."""
    names = ("specfleet_kv_free_tokens", "specfleet_kv_total_tokens", "specfleet_replica_running",
             "specfleet_replica_waiting")
    while True:
        try:
            text = (await client.get("/metrics")).text
            row: dict = {"t": round(time.perf_counter() - t0, 3)}
            for line in text.splitlines():
                for n in names:
                    if line.startswith(n + "{"):
                        rep = line.split('replica="', 1)[1].split('"', 1)[0]
                        row.setdefault(rep, {})[n.removeprefix("specfleet_")] = float(line.rsplit(" ", 1)[1])
            out.append(row)
        except (httpx.HTTPError, IndexError, ValueError):
            pass
        await asyncio.sleep(period_s)


async def replay(base_url: str, model: str, sessions, concurrency: int, duration_s: float,
                 api_key: str | None = None, metrics_log: list | None = None) -> list[Measured]:
    metrics_log = [] if metrics_log is None else metrics_log
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency * 2 + 4)
    records: list[Measured] = []
    t0 = time.perf_counter()
    queue = list(sessions)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:

        async def run_session(s) -> None:
            r = await client.post("/v1/sessions", json={"role": s.role, "team": s.team,
                                                        "metadata": {"trace_id": s.session_id}})
            r.raise_for_status()
            sid = r.json()["id"]
            messages = [{"role": "system", "content": s.system}]
            for i, turn in enumerate(s.turns):
                if i:
                    await asyncio.sleep(turn.think_s)
                messages.append({"role": "user", "content": turn.user})
                rec = Measured(s.session_id, s.team, s.role, i, 0.0, server_session=sid)
                rec.t_arrive = time.perf_counter()
                answer = await _turn(client, model, sid, messages, turn.max_tokens, rec)
                records.append(rec)
                if rec.status != 200:
                    return  # a refused turn ends the agent's session (as in the simulator)
                messages.append({"role": "assistant", "content": answer})

        async def worker() -> None:
            while queue and time.perf_counter() - t0 < duration_s:
                await run_session(queue.pop(0))

        sampler = asyncio.create_task(sample_metrics(client, t0, metrics_log))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        sampler.cancel()
        # per-turn acceptance from the session registry
        for sid in {r.server_session for r in records}:
            hist = (await client.get(f"/v1/sessions/{sid}")).json().get("replica_history", [])
            by_turn = {h["turn"]: h for h in hist}
            mine = sorted((r for r in records if r.server_session == sid and r.status == 200), key=lambda r: r.turn)
            for r in mine:
                h = by_turn.get(r.turn)
                if h:
                    r.tau = h.get("tau")
                    r.extra = {k: h.get(k) for k in ("replica", "route", "spec", "completion_tokens",
                                                      "target_passes") if k in h}
                    passes = h.get("target_passes") or 0
                    if r.spec.startswith("block") and passes:
                        r.spec_passes, r.spec_tokens = passes, h.get("completion_tokens") or r.generated
    return records


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"specfleet serve exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"specfleet serve not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the server's process group (graceful drain), SIGKILL it after 60 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_policy(policy: str, cfg: dict, trace, args, out: Path) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg.setdefault("router", {})["policy"] = policy
    cfg.setdefault("http", {}).update(host="127.0.0.1", port=args.port)
    cfg.setdefault("persistence", {})["sqlite_path"] = str(out / f"{policy}.sqlite")
    cfg_path = out / f"{policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for stale in out.glob(f"{policy}.sqlite*"):
        stale.unlink()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    base = f"http://127.0.0.1:{args.port}"
    for attempt in range(3):  # a loaded machine sometimes fails Ray's own start-up: try again
        log = open(out / f"{policy}.serve.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_ready(base, proc, args.startup_timeout_s)
            break
        except (RuntimeError, TimeoutError) as exc:
            print(f"[{policy}] start-up attempt {attempt + 1} failed: {exc}", flush=True)
            _stop(proc)
            log.close()
            if attempt == 2:
                raise
            time.sleep(10)
    try:
        print(f"[{policy}] server ready; replaying {len(trace)} sessions at concurrency {args.concurrency}",
              flush=True)
        samples: list = []
        t_start = time.time()
        recs = asyncio.run(replay(base, cfg.get("model", {}).get("name", "specfleet-demo"), trace,
                                  args.concurrency, args.duration_s, metrics_log=samples))
        wall = time.time() - t_start
    finally:
        _stop(proc)
        log.close()
    with open(out / f"{policy}.requests.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(asdict(r)) + "\n")
    with open(out / f"{policy}.metrics.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    summary = summarize(recs)
    summary["wall_s"] = round(wall, 1)
    summary["kv_total_by_replica"] = {k: v.get("kv_total_tokens") for k, v in (samples[-1] if samples else {}).items()
                                      if isinstance(v, dict)}
    summary["oom_events"] = sum(1 for r in recs if "out of memory" in r.error.lower())
    summary["replicas"] = _count(r.replica for r in recs if r.status == 200)
    summary["reasons"] = _count(r.reason for r in recs if r.status == 200)
    summary["policy"] = policy
    (out / f"{policy}.summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{policy}] {json.dumps(summary)}", flush=True)
    return summary


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="specfleet router vs Serve's pow2 vs session hashing, real stack")
    ap.add_argument("--config", required=True, help="ServeConfig YAML of the fleet (router.policy is overridden)")
    ap.add_argument("--trace", required=True, help="JSONL from benchmarks.workload")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--concurrency", type=int, default=6, help="agent sessions running at once")
    ap.add_argument("--duration-s", type=float, default=150.0, help="start no session after this")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(a.config).read_text())
    _, trace = load(a.trace)
    results = {}
    for policy in a.policies.split(","):
        if policy not in POLICIES:
            ap.error(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        results[policy] = run_policy(policy, cfg, trace, a, out)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if "specfleet" in results:
        for base in ("pow2", "consistent_hash"):
            if base in results and results[base]["goodput_tps"]:
                print(f"goodput specfleet / {base}: {results['specfleet']['goodput_tps'] / results[base]['goodput_tps']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
