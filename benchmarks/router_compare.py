"""Router comparison on the real serving stack: the same trace, the same replicas, one run per policy.

For each policy (specfleet, pow2, consistent_hash) it starts `specfleet serve` with the given
ServeConfig (router.policy overridden, loopback only), replays the trace (benchmarks/workload.py)
through the OpenAI API with streaming — sessions opened with POST /v1/sessions (role, team), turns
sent with x-session-id, each turn's prompt = the session's whole conversation so far — and records
per request: arrival, first token, end, tokens, HTTP status, the x-specfleet-replica / -route /
-spec headers; then per-turn acceptance from GET /v1/sessions/{id}; from /metrics every 2 s, each replica's KV,
queue and decode-step EWMAs (out/{policy}.metrics.jsonl), and its start-up step-cost table with its decode-step
EWMAs at the end (out/{policy}.replica_stats.json: benchmarks/replica_stats.py). Runs are bounded by
--duration-s (sessions not started by then are skipped; in-flight turns are allowed to finish).
`--concurrency` closed-loop clients each run one agent session at a time.

Single run (one trace file; out/{policy}.* and out/summary.json = {policy: summary}):

    python -m benchmarks.router_compare --config benchmarks/configs/cpu_fleet.yaml \
        --trace runs/trace.jsonl --concurrency 6 --duration-s 150 --out runs/compare

Trials (one trace per workload seed, generated from the workload flags; every policy on every trace, the policy
order rotated from trial to trial; out/seed{S}/ holds each trial as a single run does, out/summary.json the
median and spread over trials: benchmarks/trials.py; `python -m benchmarks.report out/summary.json` prints it):

    python -m benchmarks.router_compare --config benchmarks/configs/cpu_fleet_specialised.yaml \
        --seeds 11,12,13 --teams 5 --rate 1 --max-tokens-scale 0.5 --concurrency 4 --duration-s 150 \
        --out runs/compare_specialised

Fairness: a fresh server per run; pow2 and consistent_hash run speculation at the drafter's block size on every
request (`--baseline-spec fixed`, the default: router.weights.steer_spec / steer_block off for them, since a
replica otherwise steers speculation on its own stats under every policy: decisions.choose_spec); specfleet
steers per request. Replicas' torch threads: OMP_NUM_THREADS=--omp-threads (1) in the server's environment,
which Ray workers inherit. Relative drafter paths in the config are taken from the repository root; a drafter
that does not exist stops the run before anything starts, unless --drafter-fallback names a stand-in (smoke
runs before the drafters are trained; recorded in the summary as `substituted_drafters`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks import replica_stats, run_meta
from benchmarks.fleet_labels import label_replicas
from benchmarks.simulator import summarize
from benchmarks.trials import aggregate, tau_by_replica_role
from benchmarks.workload import add_workload_args, config_from_args, generate, load, save
from orchestrator.config import ServeConfig

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
                rec: Measured, extra_body: dict | None = None) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra_body or {})}
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


METRIC_NAMES = ("specfleet_kv_free_tokens", "specfleet_kv_total_tokens", "specfleet_replica_running",
                "specfleet_replica_waiting", *replica_stats.DECODE)


async def scrape_metrics(client: httpx.AsyncClient, t0: float, out: list, stats: dict | None = None) -> None:
    """One /metrics scrape: per-replica KV headroom, queue and decode-step EWMA gauges appended to ``out`` as a
    row; each replica's step-cost table and decode EWMAs (benchmarks/replica_stats.py) kept in ``stats``
    ({"t_s", "replicas": {id: ...}}, the latest scrape's per replica). A failed scrape is skipped."""
    try:
        text = (await client.get("/metrics")).text
        t = round(time.perf_counter() - t0, 3)
        row: dict = {"t": t}
        for line in text.splitlines():
            for n in METRIC_NAMES:
                if line.startswith(n + "{"):
                    rep = line.split('replica="', 1)[1].split('"', 1)[0]
                    row.setdefault(rep, {})[n.removeprefix("specfleet_")] = float(line.rsplit(" ", 1)[1])
        out.append(row)
        if stats is not None:
            seen = replica_stats.parse_metrics(text)
            if seen:
                stats["t_s"] = t
                stats.setdefault("replicas", {}).update(seen)
    except (httpx.HTTPError, IndexError, ValueError):
        pass


async def sample_metrics(client: httpx.AsyncClient, t0: float, out: list, period_s: float = 2.0,
                         stats: dict | None = None) -> None:
    """``scrape_metrics`` every period_s (headroom-over-time plot, the replicas' decode steps)."""
    while True:
        await scrape_metrics(client, t0, out, stats)
        await asyncio.sleep(period_s)


async def replay(base_url: str, model: str, sessions, concurrency: int, duration_s: float,
                 api_key: str | None = None, metrics_log: list | None = None,
                 extra_body: dict | None = None, stats: dict | None = None) -> list[Measured]:
    """Closed loop: `concurrency` clients, each running the next session of the trace until the trace or
    `duration_s` runs out. ``extra_body``: fields added to every chat request (e.g. the `spec` extension).
    ``metrics_log`` / ``stats``: filled by ``sample_metrics`` during the run and one last scrape at its end."""
    metrics_log = [] if metrics_log is None else metrics_log
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency * 2 + 4)
    records: list[Measured] = []
    t0 = time.perf_counter()
    queue = list(sessions)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:

        async def run_session(s) -> None:
            try:
                r = await client.post("/v1/sessions", json={"role": s.role, "team": s.team,
                                                            "metadata": {"trace_id": s.session_id}})
                r.raise_for_status()
                sid = r.json()["id"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:  # the session's first turn counts as failed
                rec = Measured(s.session_id, s.team, s.role, 0, time.perf_counter(), t_done=time.perf_counter(),
                               status=getattr(getattr(exc, "response", None), "status_code", 599),
                               error=f"POST /v1/sessions: {type(exc).__name__}: {exc}"[:300])
                records.append(rec)
                return
            messages = [{"role": "system", "content": s.system}]
            for i, turn in enumerate(s.turns):
                if i:
                    await asyncio.sleep(turn.think_s)
                messages.append({"role": "user", "content": turn.user})
                rec = Measured(s.session_id, s.team, s.role, i, 0.0, server_session=sid)
                rec.t_arrive = time.perf_counter()
                answer = await _turn(client, model, sid, messages, turn.max_tokens, rec, extra_body)
                records.append(rec)
                if rec.status != 200:
                    return  # a refused turn ends the agent's session (as in the simulator)
                messages.append({"role": "assistant", "content": answer})

        async def worker() -> None:
            while queue and time.perf_counter() - t0 < duration_s:
                await run_session(queue.pop(0))

        sampler = asyncio.create_task(sample_metrics(client, t0, metrics_log, stats=stats))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        sampler.cancel()
        await scrape_metrics(client, t0, metrics_log, stats)  # the replicas' EWMAs as the run ends
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
        try:  # every replica live (real engines calibrate at start-up: /v1/models answers before they report)
            r = httpx.get(base_url + "/health", timeout=2.0)
            body = r.json() if r.status_code == 200 else {}
            reps = body.get("replicas") or {}
            if body.get("status") == "ok" and reps.get("live") is not None and reps.get("live") == reps.get("expected"):
                return
        except (httpx.HTTPError, ValueError):
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


# ---------------------------------------------------------------- configs
def resolve_drafters(cfg: dict, fallback: str | None = None) -> tuple[dict, dict[str, str]]:
    """(config with every drafter path absolute, {missing path: stand-in}). Real engines only: relative paths are
    taken from the repository root ("default" / "none" / null stay as they are). A path that does not exist is a
    ValueError, or replaced by ``fallback`` (itself checked) when given."""
    cfg = json.loads(json.dumps(cfg))
    if cfg.get("engine", "real") == "mock":
        return cfg, {}
    subs: dict[str, str] = {}

    def fix(d: str | None) -> str | None:
        if d in (None, "none", "", "default"):
            return d
        p = Path(d).expanduser()
        p = p if p.is_absolute() else run_meta.REPO_ROOT / p
        if (p / "config.json").is_file():
            return str(p)
        if fallback is None:
            raise ValueError(f"drafter {d} not found ({p}/config.json): train it first, or pass "
                             f"--drafter-fallback models/smollm2-135m-dflash-b16 for a smoke run")
        fb = fix(fallback)
        subs[str(p)] = fb
        return fb

    model = cfg.setdefault("model", {})
    if "drafter" in model:
        model["drafter"] = fix(model["drafter"])
    for spec in cfg.get("replicas") or []:
        if "drafter" in spec:
            spec["drafter"] = fix(spec["drafter"])
    return cfg, subs


def load_config(path: str, fallback: str | None = None, check=ServeConfig.model_validate) -> tuple[dict, dict]:
    """(config, {missing drafter: stand-in}) from the YAML at ``path``: checked by ``check`` (raises ValueError on
    a bad one), drafter paths resolved (``resolve_drafters``), a warning printed for every stand-in. Raises
    ValueError, OSError or yaml.YAMLError for the caller to report."""
    cfg = yaml.safe_load(Path(path).read_text())
    check(cfg)
    cfg, subs = resolve_drafters(cfg, fallback)
    for missing, stand_in in subs.items():
        print(f"WARNING: drafter {missing} does not exist; {stand_in} stands in (smoke run, not a measurement)",
              flush=True)
    return cfg, subs


def policy_config(cfg: dict, policy: str, baseline_spec: str = "fixed") -> dict:
    """The fleet config for one policy's run: router.policy set; a baseline with ``baseline_spec`` "fixed" runs
    speculation at the drafter's block on every request (steering off: it has no acceptance feedback), "steered"
    leaves the replica's own steering (decisions.choose_spec) on."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if baseline_spec not in ("fixed", "steered"):
        raise ValueError(f"baseline_spec must be fixed or steered, got {baseline_spec!r}")
    cfg = json.loads(json.dumps(cfg))
    router = cfg.setdefault("router", {})
    router["policy"] = policy
    if policy != "specfleet" and baseline_spec == "fixed":
        router.setdefault("weights", {}).update(steer_spec=False, steer_block=False)
    return cfg


# ---------------------------------------------------------------- one run
def serve_and_replay(name: str, cfg: dict, trace, concurrency: int, duration_s: float, out: Path, *,
                     port: int, startup_timeout_s: float, omp_threads: int | None = 1,
                     extra_body: dict | None = None) -> dict:
    """Start `specfleet serve` with ``cfg`` (loopback, port, a fresh SQLite), replay ``trace``, stop it. Writes
    out/{name}.yaml, .serve.log, .requests.jsonl, .metrics.jsonl, .replica_stats.json (each replica's start-up
    step-cost table and decode-step EWMAs at the end: benchmarks/replica_stats.py), .summary.json; returns the
    summary."""
    cfg = json.loads(json.dumps(cfg))
    cfg.setdefault("http", {}).update(host="127.0.0.1", port=port)
    cfg.setdefault("persistence", {})["sqlite_path"] = str(out / f"{name}.sqlite")
    ServeConfig.model_validate(cfg)  # a bad config fails here, not after a Ray start-up
    cfg_path = out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for stale in out.glob(f"{name}.sqlite*"):
        stale.unlink()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    base = f"http://127.0.0.1:{port}"
    load_start, started = run_meta.loadavg(), run_meta.utc_now()
    for attempt in range(3):  # a loaded machine sometimes fails Ray's own start-up: try again
        log = open(out / f"{name}.serve.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_ready(base, proc, startup_timeout_s)
            break
        except (RuntimeError, TimeoutError) as exc:
            print(f"[{name}] start-up attempt {attempt + 1} failed: {exc}", flush=True)
            _stop(proc)
            log.close()
            if attempt == 2:
                raise
            time.sleep(10)
    try:
        print(f"[{name}] server ready; replaying {len(trace)} sessions at concurrency {concurrency}", flush=True)
        samples: list = []
        stats: dict = {}
        t_start = time.time()
        recs = asyncio.run(replay(base, cfg.get("model", {}).get("name", "specfleet-demo"), trace,
                                  concurrency, duration_s, metrics_log=samples, extra_body=extra_body,
                                  stats=stats))
        wall = time.time() - t_start
    finally:
        _stop(proc)
        log.close()
    with open(out / f"{name}.requests.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(asdict(r)) + "\n")
    with open(out / f"{name}.metrics.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    replica_stats.save(out / f"{name}.replica_stats.json", stats.get("replicas", {}), stats.get("t_s"))
    labels, ambiguous = label_replicas(ServeConfig.model_validate(cfg), samples)
    summary = summarize(recs)
    summary["wall_s"] = round(wall, 1)
    summary["concurrency"] = concurrency
    summary["sessions_in_trace"] = len(trace)
    summary["sessions_started"] = len({r.session for r in recs})
    summary["kv_total_by_replica"] = {k: v.get("kv_total_tokens") for k, v in (samples[-1] if samples else {}).items()
                                      if isinstance(v, dict)}
    summary["oom_events"] = sum(1 for r in recs if "out of memory" in r.error.lower())
    summary["replicas"] = _count(r.replica for r in recs if r.status == 200)
    summary["replica_labels"] = labels
    summary["replica_labels_ambiguous"] = ambiguous
    summary["tau_by_replica_role"] = tau_by_replica_role(recs, labels)
    summary["reasons"] = _count(r.reason for r in recs if r.status == 200)
    summary["spec"] = _count(r.spec or "?" for r in recs if r.status == 200)
    summary["started"], summary["loadavg_start"] = started, load_start
    summary["loadavg_end"] = run_meta.loadavg()
    summary["name"] = name
    (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{name}] {json.dumps({k: summary[k] for k in ('goodput_tps', 'completed', 'rejected_429', 'errors')})}",
          flush=True)
    return summary


RUN_ERRORS = (RuntimeError, TimeoutError, OSError, httpx.HTTPError)  # a run whose server failed: recorded, not fatal


def failed_run(exc: BaseException, where: str) -> dict:
    """A run that raised one of RUN_ERRORS: says so on stdout, returns its record in a trial ({"failed": "Type:
    message"}, 300 characters at most), which trials.aggregate counts and leaves out of every spread."""
    print(f"{where}: run failed: {exc}", flush=True)
    return {"failed": f"{type(exc).__name__}: {exc}"[:300]}


def run_policy(policy: str, cfg: dict, trace, args, out: Path) -> dict:
    summary = serve_and_replay(policy, policy_config(cfg, policy, args.baseline_spec), trace, args.concurrency,
                               args.duration_s, out, port=args.port, startup_timeout_s=args.startup_timeout_s,
                               omp_threads=args.omp_threads)
    summary["policy"], summary["baseline_spec"] = policy, args.baseline_spec
    (out / f"{policy}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def rotated(items: list[str], k: int) -> list[str]:
    """items started at position k (mod len): trial k runs the policies in this order, so no policy always runs
    first (a machine warming up or drifting favours no one)."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def parse_seeds(seeds: str | None, trials: int | None) -> list[int] | None:
    """--seeds / --trials -> the seeds (None: single-run mode). --trials N alone: seeds 0..N-1."""
    if seeds is None and trials is None:
        return None
    if seeds is not None:
        try:
            out = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be integers separated by commas, got {seeds!r}") from None
        if not out or len(set(out)) != len(out):
            raise ValueError(f"--seeds must name distinct seeds, got {seeds!r}")
        if trials is not None and trials != len(out):
            raise ValueError(f"--trials {trials} but {len(out)} seeds in --seeds {seeds}")
        return out
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    return list(range(trials))


def new_trial(wcfg, seed: int, tdir: Path, policies: list[str], k: int) -> tuple[list, dict]:
    """(trace, record) of one trial: the trace generated from ``wcfg`` and saved as tdir/trace.jsonl; the record
    {"seed", "dir", "order": policies rotated by k, "policies": {}} that the runs fill in (trials.aggregate)."""
    trace = generate(wcfg)
    tdir.mkdir(parents=True, exist_ok=True)
    save(tdir / "trace.jsonl", wcfg, trace)
    return trace, {"seed": seed, "dir": str(tdir), "order": rotated(policies, k), "policies": {}}


def run_trials(cfg: dict, seeds: list[int], policies: list[str], args, out: Path, run=None) -> dict:
    """Every policy on one trace per seed; out/seed{S}/ per trial; the aggregate (benchmarks/trials.py) in
    out/summary.json, rewritten after every run (a long run that stops early keeps what it measured).
    A policy whose server could not start (three attempts) is recorded as failed and the trials go on."""
    run = run or run_policy
    m = run_meta.meta("benchmarks.router_compare", getattr(args, "argv", None))
    trials: list[dict] = []
    summary: dict = {}
    for i, seed in enumerate(seeds):
        wcfg = config_from_args(args, seed=seed)
        tdir = out / f"seed{seed}"
        trace, trial = new_trial(wcfg, seed, tdir, policies, i)
        trials.append(trial)
        for policy in trial["order"]:
            try:
                trial["policies"][policy] = run(policy, cfg, trace, args, tdir)
            except RUN_ERRORS as exc:
                trial["policies"][policy] = failed_run(exc, f"[{policy}] seed {seed}")
            (tdir / "summary.json").write_text(json.dumps(trial["policies"], indent=2))
            summary = {"kind": "router_compare_trials", "meta": run_meta.finish(m), "config": cfg,
                       "substituted_drafters": getattr(args, "substituted", {}), "concurrency": args.concurrency,
                       "duration_s": args.duration_s, "baseline_spec": args.baseline_spec,
                       "omp_threads": args.omp_threads, "workload": {k: v for k, v in asdict(wcfg).items()
                                                                     if k != "seed"},
                       "seeds": seeds, "trials": trials, **aggregate(trials)}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="specfleet router vs Serve's pow2 vs session hashing, real stack")
    ap.add_argument("--config", required=True, help="ServeConfig YAML of the fleet (router.policy is overridden)")
    ap.add_argument("--trace", help="JSONL from benchmarks.workload (single-run mode)")
    ap.add_argument("--trials", type=int, help="trials per policy (seeds 0..N-1 unless --seeds)")
    ap.add_argument("--seeds", help="workload seeds, one trial each, e.g. 11,12,13 (trials mode)")
    add_workload_args(ap, seed=False)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--concurrency", type=int, default=6, help="agent sessions running at once")
    ap.add_argument("--duration-s", type=float, default=150.0, help="start no session after this")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--baseline-spec", choices=("fixed", "steered"), default="fixed",
                    help="baselines: speculation at the drafter's block on every request (fixed), or the replica's "
                    "own steering (steered)")
    ap.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of the server (torch threads per "
                    "replica); 0 = leave the environment's")
    ap.add_argument("--drafter-fallback", help="stand-in for drafters that do not exist yet (smoke runs only)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    a.argv = argv
    policies = [p for p in a.policies.split(",") if p]
    for policy in policies:
        if policy not in POLICIES:
            ap.error(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    try:
        seeds = parse_seeds(a.seeds, a.trials)
        if seeds is not None:
            if a.trace:
                raise ValueError("--trace is the single-run mode; trials generate one trace per seed from the "
                                 "workload flags (--teams, --rate, ...)")
            config_from_args(a, seed=0)
        elif not a.trace:
            raise ValueError("give --trace (one run per policy) or --seeds / --trials (repeated trials)")
        cfg, a.substituted = load_config(a.config, a.drafter_fallback)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        ap.error(str(exc))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if seeds is not None:
        summary = run_trials(cfg, seeds, policies, a, out)
        from benchmarks.report import compare_tables

        print(compare_tables(summary))
        return 0
    _, trace = load(a.trace)
    if Path(a.trace).resolve() != (out / "trace.jsonl").resolve():  # the run's folder is self-contained
        shutil.copyfile(a.trace, out / "trace.jsonl")
    results = {}
    for policy in policies:
        results[policy] = run_policy(policy, cfg, trace, a, out)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if "specfleet" in results:
        for base in ("pow2", "consistent_hash"):
            if base in results and results[base]["goodput_tps"]:
                ratio = results["specfleet"]["goodput_tps"] / results[base]["goodput_tps"]
                print(f"goodput specfleet / {base}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
