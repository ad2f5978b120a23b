"""Load test of the embedded server (issue 8): N concurrent streaming clients for D seconds against
`specfleet serve` on loopback, then a report: completed requests, errors (429s counted apart: they
are designed back-pressure), p50/p99 latency and time to first token, throughput, and the RSS of the
whole server process tree (Ray included) before and after the load.

    python benchmarks/load.py                                   # 200 clients, 60 s, mock engine
    python benchmarks/load.py --engine real --max-tokens 32     # the demo pair (SmolLM2 + DFlash)
    python benchmarks/load.py --url http://127.0.0.1:8000 --key sk-...   # an already running server

Bounded and self-stopping: the load phase ends at --duration, streams still open get --grace
seconds, then the server is stopped with SIGINT (graceful drain) and killed if it does not exit.
Loopback only: the server it starts listens on 127.0.0.1. Each client plays one agent: it opens a
session (POST /v1/sessions, own role/team) and sends streamed turns with x-session-id; every
--new-session-every turns it starts a new session. Results: printed, and as JSON with --json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("planner", "coder", "reviewer", "tester")


@dataclass
class Tally:
    completed: int = 0
    tokens: int = 0
    throttled_429: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    sessions: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


# ---------------------------------------------------------------------------------------------
# server under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(args, port: int, keys: list[str], tmp: Path) -> dict:
    cfg: dict = {
        "engine": args.engine,
        "http": {"host": "127.0.0.1", "port": port},
        "auth": {"keys": keys, "keys_env": None},
        "persistence": {"sqlite_path": str(tmp / "sessions.sqlite")},
        "limits": {"max_tokens": max(64, args.max_tokens), "per_key_concurrency": 64, "per_key_queue": 256},
        "replicas": [{"count": args.replicas, "max_num_seqs": args.max_num_seqs,
                      "max_ongoing_requests": args.max_ongoing}],
    }
    if args.engine == "mock":
        cfg["replicas"][0]["mock"] = {"step_ms": args.mock_step_ms, "acceptance": 0.7,
                                      "acceptance_by_role": {"coder": 0.85, "reviewer": 0.5}}
    return cfg


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants (the serve process, Ray's GCS, raylet,
    dashboard, proxy, controller, ingress and replica workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far per process of the server tree, keyed by process title
    (Ray sets e.g. "ray::ProxyActor", "ray::ServeReplica:specfleet:Ingress")."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            cmd = p.cmdline()
            title = (cmd[0] if cmd else p.name()).split("/")[-1]
            if title.startswith("python") and len(cmd) > 1:
                title = " ".join(cmd[1:3])
            t = p.cpu_times()
            out[title[:60]] = out.get(title[:60], 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def start_server(args, keys: list[str], tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    import yaml

    port = free_port()
    cfg_path = tmp / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(server_config(args, port, keys, tmp)))
    log_path = tmp / "serve.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"specfleet serve exited with {proc.returncode}; log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"server not healthy after {args.start_timeout} s; log: {log_path}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 90) -> float:
    """SIGINT (graceful drain), then SIGKILL of the process group it leads if it hangs."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# clients


async def one_turn(client: httpx.AsyncClient, url: str, headers: dict, body: dict, tally: Tally,
                   stop_at: float) -> float:
    """One streamed turn; returns seconds to wait before the next one (Retry-After on 429)."""
    t0 = time.monotonic()
    first = None
    ntok = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", headers=headers, json=body) as r:
            if r.status_code == 429:
                tally.throttled_429 += 1
                await r.aread()
                return float(r.headers.get("retry-after", "1"))
            if r.status_code != 200:
                await r.aread()
                tally.error(f"http_{r.status_code}")
                return 0.5
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    tally.error("stream_error:" + str(ev["error"].get("code")))
                    return 0.5
                if ev.get("choices") and (ev["choices"][0].get("delta") or {}).get("content"):
                    if first is None:
                        first = time.monotonic() - t0
                    ntok += 1
            if not done:
                tally.error("stream_cut")
                return 0.5
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        tally.error(type(exc).__name__)
        return 0.5
    tally.completed += 1
    tally.tokens += ntok
    tally.latency_s.append(time.monotonic() - t0)
    if first is not None:
        tally.ttft_s.append(first)
    return 0.0


async def agent(i: int, client: httpx.AsyncClient, url: str, key: str, args, tally: Tally, stop_at: float):
    auth = {"authorization": f"Bearer {key}"}
    role, team = ROLES[i % len(ROLES)], f"team-{i % 8}"
    sid, turns = None, 0
    while time.monotonic() < stop_at:
        if sid is None or turns >= args.new_session_every:
            try:
                r = await client.post(url + "/v1/sessions", headers=auth, json={"role": role, "team": team})
            except httpx.HTTPError as exc:
                tally.error("session_" + type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if r.status_code != 200:
                tally.error(f"session_http_{r.status_code}")
                await asyncio.sleep(0.5)
                continue
            sid, turns = r.json()["id"], 0
            tally.sessions += 1
        body = {"model": "specfleet-demo", "stream": True, "max_tokens": args.max_tokens, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"agent {i} turn {turns}: continue the task"}]}
        wait = await one_turn(client, url, {**auth, "x-session-id": sid}, body, tally, stop_at)
        turns += 1
        if wait:
            await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))


async def run_load(url: str, keys: list[str], args, duration: float, progress: bool) -> tuple[Tally, float]:
    tally = Tally()
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        t0 = time.monotonic()
        stop_at = t0 + duration
        tasks = [asyncio.create_task(agent(i, client, url, keys[i % len(keys)], args, tally, stop_at))
                 for i in range(args.clients)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(duration), desc=f"load x{args.clients}", unit="s", leave=False)
        while time.monotonic() < stop_at:
            await asyncio.sleep(1.0)
            if bar is not None:
                bar.n = min(int(duration), int(time.monotonic() - t0))
                bar.set_postfix(done=tally.completed, err=sum(tally.errors.values()), r429=tally.throttled_429)
        if bar is not None:
            bar.close()
        # the turns still running get `grace` seconds, then the rest is cancelled (counted as cut)
        _, pending = await asyncio.wait(tasks, timeout=args.grace)
        for t in pending:
            t.cancel()
        if pending:
            tally.error("cancelled_after_grace")
        await asyncio.gather(*tasks, return_exceptions=True)
        return tally, time.monotonic() - t0


def summary(tally: Tally, wall: float) -> dict:
    return {
        "completed": tally.completed, "errors": sum(tally.errors.values()), "errors_by_kind": tally.errors,
        "throttled_429": tally.throttled_429, "sessions": tally.sessions,
        "requests_per_s": round(tally.completed / wall, 2) if wall else None,
        "stream_chunks_per_s": round(tally.tokens / wall, 1) if wall else None,
        "latency_p50_s": pct(tally.latency_s, 50), "latency_p99_s": pct(tally.latency_s, 99),
        "latency_mean_s": statistics.fmean(tally.latency_s) if tally.latency_s else None,
        "ttft_p50_s": pct(tally.ttft_s, 50), "ttft_p99_s": pct(tally.ttft_s, 99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the 'before' RSS sample")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds for open streams after the load phase")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--new-session-every", type=int, default=5, help="turns per session")
    ap.add_argument("--engine", choices=["mock", "real"], default="mock")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-ongoing", type=int, default=128, help="Serve's max_ongoing_requests per replica")
    ap.add_argument("--mock-step-ms", type=float, default=10.0)
    ap.add_argument("--keys", type=int, default=4, help="API keys the clients are spread over")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--url", help="use a running server instead of starting one (no RSS figures)")
    ap.add_argument("--key", action="append", help="API key(s) for --url")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="specfleet-load-"))
    keys = args.key or [f"sk-load-{i:02d}-{os.urandom(6).hex()}" for i in range(args.keys)]
    proc = None
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
                    "argv": sys.argv[1:] if argv is None else argv, "config": vars(args) | {"key": None}}
    result["loadavg_start"] = os.getloadavg()
    try:
        if args.url:
            url = args.url
        else:
            t0 = time.monotonic()
            proc, url, log_path = start_server(args, keys, tmp)
            result["server_start_s"] = round(time.monotonic() - t0, 1)
            result["server_log"] = str(log_path)
            result["rss_idle_bytes"] = tree_rss(proc.pid)
        progress = not args.no_progress and sys.stderr.isatty()
        if args.warmup > 0:
            warm, _ = asyncio.run(run_load(url, keys, args, args.warmup, progress))
            result["warmup"] = {"completed": warm.completed, "errors": sum(warm.errors.values()),
                                "errors_by_kind": warm.errors, "throttled_429": warm.throttled_429}
        if proc is not None:
            result["rss_before_bytes"] = tree_rss(proc.pid)
            cpu0 = tree_cpu(proc.pid)
        tally, wall = asyncio.run(run_load(url, keys, args, args.duration, progress))
        result["load"] = summary(tally, wall) | {"wall_s": round(wall, 1)}
        if proc is not None:
            result["rss_after_bytes"] = tree_rss(proc.pid)
            cpu1 = tree_cpu(proc.pid)
            used = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()}
            result["server_cpu_s_during_load"] = dict(sorted(used.items(), key=lambda kv: -kv[1])[:10])
            time.sleep(5)
            result["rss_after_idle_5s_bytes"] = tree_rss(proc.pid)
            before, after = result["rss_before_bytes"], result["rss_after_bytes"]
            result["rss_change_pct"] = round(100.0 * (after - before) / before, 2) if before else None
            r = httpx.get(url + "/health", timeout=5)
            result["health_after"] = r.status_code
        result["loadavg_end"] = os.getloadavg()  # the machine's load: other jobs share these cores
    finally:
        if proc is not None:
            result["server_stop_s"] = round(stop_server(proc), 1)
            result["server_exit_code"] = proc.returncode
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    load = result.get("load", {})
    return 0 if load.get("errors", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
