"""What one routing decision costs at fleet scale: 64 replicas whose routing stats hold 10K sessions.

    python -m benchmarks.router_cost [--replicas 64] [--sessions 10000] [--per-replica 1250] [--cached 200]
        [--decisions 3000] [--rate 1000] [--stats-period 1.0] [--new-frac 0.3] [--seed 0] [--out FILE]
        [--step-costs measured|none]

Every replica reports what a replica's ``record_routing_stats()`` returns (``RoutingStats.to_dict()``):
``--per-replica`` sessions drawn from ``--sessions`` with their tau (by session, constrained session, role,
team, grammar kind), ``--cached`` of them with a resident KV prefix, step times at blocks 4 / 8 / 16 (live EWMAs, and with
``--step-costs measured``, the default as served replicas calibrate at start-up, the measured step-cost table:
AR and blocks 4 / 8 / 16 at batches 1 / 4 / 16; added to the report dict, which code before tables ignores).
Requests: ``--new-frac`` of them from sessions no replica has seen, the rest from known sessions (random
role-team pairs as the sessions have them, growing prompts with a cached prefix where one is resident).

(a) router: ``SpecfleetRouter.choose_replicas`` as Serve calls it, on stand-ins for Serve's RunningReplica
    (replica id + the routing-stats dict) and PendingRequest (the ingress's ``route=`` hints): everything
    the router does per request (stats handling, in-flight correction, ``rank``, the RouteDecision written
    into the call's kwargs). Reports keep arriving as Serve delivers them: each replica reports every
    ``--stats-period`` seconds at ``--rate`` decisions/s, and each report hands the router new dict objects
    for every replica (Serve's long poll sends the whole replica set). ``on_request_routed`` /
    ``on_request_completed`` run too (``--inflight`` requests in flight), timed apart as "bookkeeping".
    Where the router takes reports in as Serve delivers them (``update_replicas`` -> ``take_reports``: the new
    report is parsed there, between decisions), that call is timed apart as "report intake", once per report.
(b) rank: ``score.rank()`` alone on the same reports parsed once (``RoutingStats.from_dict``), same requests.
(c) parse: ``RoutingStats.from_dict`` of one report (the full parse, checked entry by entry).
(d) the router's parse: ``RoutingStats.from_report`` of one report (long tau tables read in place; where the tree
    has it).

Prints p50 / p99 / max per decision with the date, CPU and load average: wall time, and the CPU time of the
deciding thread (``time.thread_time_ns``: what the decision itself costs, without the time a busy shared
machine keeps the process waiting for a core), the latter also split into the decisions that met a new report
(the parse, the memo misses of that replica, tables gone cold: these make most of the p99) and the rest. Uses only interfaces that predate
the decision-cost work, so the same file measures the code before it (docs/routing.md, "Decision cost").
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace as NS

from orchestrator.routing.decisions import route_hints, route_request_from_hints
from orchestrator.routing.router import SpecfleetRouter
from orchestrator.routing.score import RouterWeights, rank
from orchestrator.routing.stats import RoutingStats

ROLES = ("planner", "coder", "reviewer", "tool_caller")
KINDS = ("json_schema", "tool_call", "regex")


# engine_bench.cpu_name, repeated on purpose: this file is copied into older trees to measure the code before
# the decision-cost work (docs/routing.md), so it imports nothing from benchmarks/ (run_meta is newer).
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ["?"] * 3


class Fleet:
    """The sessions (id -> (team, role)) and every replica's latest report."""

    def __init__(self, a: argparse.Namespace, rng: random.Random):
        self.a, self.rng = a, rng
        self.sessions = {f"s{i:05d}": (f"t{i // 4:04d}", ROLES[i % 4]) for i in range(a.sessions)}
        ids = list(self.sessions)
        self.stats: list[RoutingStats] = []
        for i in range(a.replicas):
            mine = rng.sample(ids, min(a.per_replica, len(ids)))
            teams = {self.sessions[s][0] for s in mine}
            ar = rng.uniform(18.0, 30.0)
            self.stats.append(RoutingStats(
                f"replica-{i:02d}", kv_total_tokens=400_000, max_num_seqs=16,
                step_ms_ar=ar, step_ms_by_block={4: ar * 1.15, 8: ar * 1.3, 16: ar * 1.6},
                tau_by_session={s: self._tau() for s in mine},
                tau_by_constrained_session={s: self._tau() for s in mine[: len(mine) // 10]},
                tau_by_role={r: (rng.uniform(1.5, 6.0), rng.randint(500, 50_000)) for r in ROLES},
                tau_by_team={t: self._tau() for t in teams},
                tau_by_constraint={k: (rng.uniform(1.5, 6.0), rng.randint(100, 5000)) for k in KINDS},
                tau_mean=rng.uniform(2.0, 4.0), cached_sessions=mine[: a.cached],
                prefill_ms_per_token=0.4,
            ))
            self._move(self.stats[-1])
        self.tables = [self._table(s.step_ms_ar) if a.step_costs == "measured" else None for s in self.stats]
        self.reports = [self._dict(i) for i in range(a.replicas)]

    @staticmethod
    def _table(ar: float) -> dict:
        """A calibration table shaped like this CPU's (docs/routing.md, 'Step costs'), scaled to ``ar`` ms."""
        rows = {"1": 1.0, "4": 1.5, "16": 4.3}
        spec = {"4": {"1": 1.9, "4": 4.3, "16": 13.0}, "8": {"1": 2.15, "4": 5.4, "16": 16.0},
                "16": {"1": 2.4, "4": 6.7, "16": 21.5}}
        return {"ar_ms": {b: ar * f for b, f in rows.items()},
                "spec_ms": {k: {b: ar * f for b, f in r.items()} for k, r in spec.items()}, "draft_ms": {}}

    def _dict(self, i: int) -> dict:
        d = self.stats[i].to_dict()
        if self.tables[i] is not None:
            d["step_costs"] = self.tables[i]
        return d

    def _tau(self) -> tuple[float, int]:
        return self.rng.uniform(1.0, 9.0), self.rng.randint(1, 300)

    def _move(self, s: RoutingStats) -> None:
        """A new measurement: load, KV and a few sessions' tau changed."""
        rng = self.rng
        s.num_running, s.num_waiting = rng.randint(0, 16), rng.choice((0, 0, 0, 1, 3))
        # the decode-step EWMAs a real engine reports (a0d0eec): steps priced by rows on the decision path
        s.step_batch = s.num_running
        s.decode_rows = s.num_running * rng.choice((1.0, 2.5, 6.0)) if s.num_running else None
        s.decode_tokens = s.num_running * rng.uniform(1.0, 2.5) if s.num_running else None
        s.decode_ms = s.step_ms_ar * rng.uniform(0.9, 3.0) if s.num_running else None
        s.kv_free_tokens = rng.randint(40_000, 380_000)
        for sid in rng.sample(list(s.tau_by_session), min(20, len(s.tau_by_session))):
            s.tau_by_session[sid] = self._tau()
        s.updated_at = time.time()

    def report(self, i: int) -> dict:
        self._move(self.stats[i])
        self.reports[i] = self._dict(i)
        return self.reports[i]

    def request(self, k: int) -> dict:
        rng = self.rng
        if rng.random() < self.a.new_frac:
            sid, (team, role) = f"new{k}", (f"t{rng.randrange(self.a.sessions // 4 + 500):04d}", rng.choice(ROLES))
            prefix = 0
        else:
            sid = f"s{rng.randrange(self.a.sessions):05d}"
            team, role = self.sessions[sid]
            prefix = rng.randint(200, 3000)
        return route_hints(f"req{k}", session_id=sid, role=role, team=team, prompt_tokens=prefix + rng.randint(50, 600),
                           max_tokens=rng.choice((64, 128, 256, 512)), prefix_tokens=prefix)


def drive(coro):
    """Run a coroutine that never suspends (choose_replicas awaits nothing) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("choose_replicas suspended")


def pcts(xs_ns: list[int]) -> dict:
    xs = sorted(x / 1e6 for x in xs_ns)
    at = lambda q: xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]  # noqa: E731
    return {"n": len(xs), "p50_ms": round(at(50), 4), "p99_ms": round(at(99), 4), "max_ms": round(xs[-1], 4),
            "mean_ms": round(statistics.fmean(xs), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--per-replica", type=int, default=1250, help="sessions in each replica's tau tables")
    p.add_argument("--cached", type=int, default=200, help="sessions with a resident KV prefix per replica")
    p.add_argument("--decisions", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=100, help="decisions before timing (first parses, caches)")
    p.add_argument("--rate", type=float, default=1000.0, help="decisions per second the report cadence assumes")
    p.add_argument("--stats-period", type=float, default=1.0, help="seconds between two reports of a replica")
    p.add_argument("--new-frac", type=float, default=0.3, help="requests from sessions nobody has seen")
    p.add_argument("--inflight", type=int, default=1024, help="requests in flight (routed, not completed)")
    p.add_argument("--parse-reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-costs", choices=("measured", "none"), default="measured",
                   help="replicas report a measured step-cost table (start-up calibration) or only EWMAs")
    p.add_argument("--out", default=None, help="write the result as JSON here too")
    a = p.parse_args()

    load_start = loadavg()
    rng = random.Random(a.seed)
    t_build = time.perf_counter()
    fleet = Fleet(a, rng)
    build_s = time.perf_counter() - t_build
    reqs = [fleet.request(k) for k in range(a.warmup + a.decisions)]

    # (a) the router as Serve drives it
    router = SpecfleetRouter.__new__(SpecfleetRouter)
    router.initialize_state(weights={}, seed=a.seed)
    replicas = [NS(replica_id=NS(unique_id=s.replica_id), routing_stats=fleet.reports[i], node_id="n0",
                   max_ongoing_requests=64) for i, s in enumerate(fleet.stats)]
    every = max(1, int(round(a.rate * a.stats_period)))  # decisions between two reports of one replica
    due = {int(i * every / a.replicas): i for i in range(a.replicas)}
    inflight: deque = deque()
    decide_ns, decide_cpu_ns, book_ns, with_report = [], [], [], 0
    cpu_new_report, cpu_no_report = [], []  # thread CPU of the decisions that met a new report, and of the rest
    # where the router parses reports as Serve hands them over (update_replicas -> take_reports), that runs
    # between decisions and is timed apart; in older trees the first decision after a report parses it
    intake, intake_ns = getattr(router, "take_reports", None), []
    for k, hints in enumerate(reqs):
        i = due.get(k % every)
        if i is not None:  # replica i reports; Serve hands over new dicts for the whole replica set
            fleet.report(i)
            for r, d in zip(replicas, fleet.reports):
                r.routing_stats = dict(d)
            if intake is not None:  # Serve calls the router's update_replicas with them (trees with the hook)
                t0 = time.perf_counter_ns()
                intake(replicas)
                if k >= a.warmup:
                    intake_ns.append(time.perf_counter_ns() - t0)
        pr = NS(kwargs={"route": dict(hints)},
                metadata=NS(session_id=hints["session_id"], internal_request_id=f"iid{k}"),
                routing_context=NS(should_backoff=False))
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        ranks = drive(router.choose_replicas(replicas, pr))
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        router.on_request_routed(pr, ranks[0][0].replica_id, None)
        inflight.append((ranks[0][0].replica_id, f"iid{k}"))
        if len(inflight) > a.inflight:
            router.on_request_completed(*inflight.popleft())
        t2 = time.perf_counter_ns()
        if k >= a.warmup:
            decide_ns.append(t1 - t0)
            decide_cpu_ns.append(c1 - c0)
            book_ns.append(t2 - t1)
            with_report += i is not None
            (cpu_new_report if i is not None else cpu_no_report).append(c1 - c0)

    # (b) rank alone on reports parsed once
    cfg = RouterWeights()
    parsed = [RoutingStats.from_dict({**d, "replica_id": s.replica_id}) for d, s in zip(fleet.reports, fleet.stats)]
    rank_ns, rank_cpu_ns = [], []
    for k, hints in enumerate(reqs):
        req = route_request_from_hints(hints)
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        rank(req, parsed, cfg)
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        if k >= a.warmup:
            rank_ns.append(t1 - t0)
            rank_cpu_ns.append(c1 - c0)

    # (c) parsing one report
    parse_ns = []
    for j in range(a.parse_reps):
        d = fleet.reports[j % a.replicas]
        t0 = time.perf_counter_ns()
        RoutingStats.from_dict(d)
        parse_ns.append(time.perf_counter_ns() - t0)
    report_ns = []  # (d) the router's parse (from_report: long tau tables read in place); absent in older trees
    from_report = getattr(RoutingStats, "from_report", None)
    for j in range(a.parse_reps if from_report is not None else 0):
        d = {**fleet.reports[j % a.replicas], "replica_id": "x"}
        t0 = time.perf_counter_ns()
        from_report(d)
        report_ns.append(time.perf_counter_ns() - t0)

    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
        "cores": os.cpu_count(), "python": platform.python_version(), "loadavg_start": load_start,
        "loadavg_end": loadavg(), "args": vars(a), "build_s": round(build_s, 2),
        "report_bytes_json": len(json.dumps(fleet.reports[0])),
        "router_decision": pcts(decide_ns), "router_decision_cpu": pcts(decide_cpu_ns),
        "router_bookkeeping": pcts(book_ns), "decisions_with_a_new_report": with_report,
        "router_report_intake": pcts(intake_ns) if intake_ns else None,
        "router_decision_cpu_new_report": pcts(cpu_new_report) if cpu_new_report else None,
        "router_decision_cpu_no_report": pcts(cpu_no_report) if cpu_no_report else None,
        "rank_only": pcts(rank_ns), "rank_only_cpu": pcts(rank_cpu_ns), "from_dict_one_report": pcts(parse_ns),
        "from_report_one_report": pcts(report_ns) if report_ns else None,
    }
    print(f"router_cost  {res['date']}  {res['cpu']} ({res['cores']} cores)  python {res['python']}")
    print(f"load average {' '.join(load_start)} -> {' '.join(res['loadavg_end'])}")
    print(f"{a.replicas} replicas x {a.per_replica} sessions ({a.sessions} in all), {a.cached} cached each; "
          f"one report {res['report_bytes_json'] / 1e3:.0f} kB as JSON; {a.decisions} decisions timed "
          f"({with_report} of them saw a new report: {a.replicas} reports per {a.stats_period:g} s at {a.rate:g}/s)")
    print(f"{'':28s}{'p50 ms':>10s}{'p99 ms':>10s}{'max ms':>10s}{'mean ms':>10s}")
    for name, key in (("(a) router decision, wall", "router_decision"), ("    same, thread CPU", "router_decision_cpu"),
                      ("    CPU, met a new report", "router_decision_cpu_new_report"),
                      ("    CPU, the others", "router_decision_cpu_no_report"),
                      ("    bookkeeping, wall", "router_bookkeeping"),
                      ("    report intake, wall", "router_report_intake"), ("(b) score.rank alone, wall", "rank_only"),
                      ("    same, thread CPU", "rank_only_cpu"), ("(c) from_dict, one report", "from_dict_one_report"),
                      ("(d) from_report, one report", "from_report_one_report")):
        r = res[key]
        if r is None:
            continue
        print(f"{name:28s}{r['p50_ms']:10.3f}{r['p99_ms']:10.3f}{r['max_ms']:10.3f}{r['mean_ms']:10.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
