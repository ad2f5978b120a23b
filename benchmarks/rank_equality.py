"""Offline equality check of the router's results against another commit (docs/routing.md, "Decision cost").

``python -m benchmarks.rank_equality --against 88f3de1 --fleets 3000`` draws random fleets and requests (taus
below 1 and at the block, speculative steps cheaper than AR, margins 0.5-1.3, client specs, probes, AR-only
replicas, step-cost tables and none, long tau tables read in place, requests in flight, the engine's decode-step
EWMAs and their corners: steps priced by rows, score.py "Mixed steps") and compares, field for field and float for
float, (1) ``score.rank()`` on parsed reports and (2) ``SpecfleetRouter.choose_replicas`` on report dicts (its ranks
and the RouteDecision written into the call's kwargs), between this tree and the tree of ``--against``
(``git archive``'d into a temporary directory; the same script runs there with the same seeds). A speed-up of the
decision path must leave every output equal. Exits 1 on the first difference. Against a commit before a0d0eec
(which does not read the decode EWMAs), add ``--no-decode-ewmas``; before cc6399e a malformed decode value in a
report raises inside a decision. Requests in flight carry the rows and tokens per step the router decided for them
(score.step_share); against a commit before that (every request in flight one AR row), add ``--no-inflight-rows``:
this tree then records every request in flight as (1 row, 1 token), which must give the older tree's results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace as NS

ROLES = ("planner", "coder", "reviewer", "tool_caller")


def _table(rng: random.Random, ar: float) -> dict:
    batches = ("1", "4", "16")
    ar_ms = {b: ar * f for b, f in zip(batches, (1.0, rng.uniform(1.1, 2.0), rng.uniform(2.0, 5.0)))}
    spec = {}
    for blk in rng.sample(["2", "4", "8", "16"], rng.randint(1, 4)):
        lo = rng.uniform(0.6, 2.5)  # below 1: a speculative step cheaper than AR
        spec[blk] = {b: ar_ms[b] * lo * (1.0 + rng.uniform(0.0, 1.5) * i) for i, b in enumerate(batches)}
    return {"ar_ms": ar_ms, "spec_ms": spec if rng.random() < 0.9 else {}, "draft_ms": {}}


def _tau(rng: random.Random, top: int) -> list:
    t = rng.choice((rng.uniform(0.5, 1.0), rng.uniform(1.0, top), float(top), rng.uniform(1.0, 3.0)))
    return [t, rng.choice((0, 1, rng.randint(1, 400)))]


def _report(rng: random.Random, i: int, sessions: list[str], teams: list[str]) -> dict:
    top = rng.choice((4, 8, 16, 16))
    ar = rng.uniform(5.0, 40.0)
    running = rng.randint(0, 20)
    mine = rng.sample(sessions, rng.randint(0, len(sessions)))
    d = {
        "replica_id": f"r{i}", "kv_total_tokens": 100_000, "kv_free_tokens": rng.randint(0, 100_000),
        "num_running": running, "num_waiting": rng.choice((0, 0, 1, 5)), "max_num_seqs": rng.choice((8, 16)),
        "step_ms_ar": rng.choice((None, ar)), "block_size_default": top, "spec_available": rng.random() < 0.85,
        "step_ms_by_block": {str(b): ar * rng.uniform(0.8, 2.0) for b in rng.sample([2, 4, 8, 16], rng.randint(0, 3))
                             if b <= top},
        "step_batch": rng.choice((None, running, max(0, running - 2))),
        "tau_by_session": {s: _tau(rng, top) for s in mine},
        "tau_by_role": {r: _tau(rng, top) for r in ROLES if rng.random() < 0.7},
        "tau_by_team": {t: _tau(rng, top) for t in teams if rng.random() < 0.5},
        "tau_mean": rng.choice((None, rng.uniform(1.0, top))),
        "cached_sessions": rng.sample(mine, min(len(mine), rng.randint(0, 30))),
        "prefill_ms_per_token": rng.choice((None, rng.uniform(0.05, 1.0))),
        "updated_at": 1000.0 + i,
    }
    if rng.random() < 0.6:
        d["step_costs"] = _table(rng, ar)
    decode = _decode(rng, running, top, ar)  # drawn whether or not reported: the same fleets either way
    if WITH_DECODE_EWMAS and decode:
        d.update(decode)
    return d


WITH_DECODE_EWMAS = True  # --no-decode-ewmas: reports without them (to compare with a commit before a0d0eec)
INFLIGHT_ROWS = True  # --no-inflight-rows: requests in flight as AR rows (a commit before score.step_share)


def _inflight(rng: random.Random, st, spec_params):
    """A parsed report with requests counted in since it, drawn the same whatever the flags: with the rows and
    tokens decided for them (blocks, taus beyond the block), without them (AR rows), or none."""
    if rng.random() >= 0.3:
        return st
    n, kv = rng.randint(1, 6), rng.randint(0, 5_000)
    blocks = [rng.choice((1, 2, 4, 8, 16)) for _ in range(n)]
    taus = [rng.choice((1.0, rng.uniform(0.5, 17.0))) for _ in range(n)]
    decided = rng.random() < 0.7
    if not (INFLIGHT_ROWS and decided):
        return st.with_inflight(n, kv)
    from orchestrator.routing.score import step_share

    shares = [step_share(spec_params(enabled=b > 1, block_size=max(b, 2)), t) for b, t in zip(blocks, taus)]
    return st.with_inflight(n, kv, sum(r for r, _ in shares), sum(t for _, t in shares))


def _decode(rng: random.Random, running: int, top: int, ar: float) -> dict:
    """The engine's decode-step EWMAs (score.py, "Mixed steps"): most reports carry them, as the real engine's do;
    rows from all-AR to all at the drafter's block, tokens up to the rows; and the corners: an idle replica's old
    EWMAs, rows below 1 (not read), a malformed value (dropped where the report is parsed)."""
    if rng.random() < 0.25:
        return {}
    rows = max(1, running) * rng.uniform(1.0, float(top))
    d = {"decode_ms": ar * rng.uniform(0.8, 4.0) * (1.0 + rows / 64.0), "decode_rows": rows,
         "decode_tokens": rows * rng.uniform(0.2, 1.0)}
    corner = rng.random()
    if corner < 0.05:
        d["decode_rows"] = rng.uniform(0.0, 1.0)
    elif corner < 0.1:
        d[rng.choice(("decode_ms", "decode_rows", "decode_tokens"))] = rng.choice(("x", float("nan"), float("inf")))
    return d


def _request(rng: random.Random, sessions: list[str], teams: list[str]) -> dict:
    spec = None
    if rng.random() < 0.1:
        spec = {"enabled": rng.random() < 0.7, "block_size": rng.choice((2, 4, 8, 16))}
    prefix = rng.randint(0, 3000)
    return {"request_id": "q", "session_id": rng.choice((None, f"new{rng.randrange(99)}", rng.choice(sessions))),
            "role": rng.choice((None,) + ROLES), "team": rng.choice((None, rng.choice(teams))),
            "prompt_tokens": prefix + rng.randint(1, 800), "max_tokens": rng.choice((16, 128, 512)),
            "prefix_tokens": prefix, "spec": spec, "spec_off_turns": rng.choice((0, 0, 3, 8, 20)), "avoid": []}


def _weights(rng: random.Random) -> dict:
    w = {}
    if rng.random() < 0.5:
        w["spec_margin"] = rng.uniform(0.5, 1.3)
    if rng.random() < 0.2:
        w["explore"] = rng.choice((0.0, 1.0))
    if rng.random() < 0.1:
        w["steer_spec"] = False
    if rng.random() < 0.1:
        w["steer_block"] = False
    if rng.random() < 0.1:
        w["block_sizes"] = [4, 8]
    if rng.random() < 0.1:
        w["congestion"] = rng.choice((0.0, 3.0))  # weighs the running sequences' loss, in the block choice too
    return w


def _f(x) -> object:
    return x.hex() if isinstance(x, float) else x


def _choice(c) -> list:
    return [c.replica_id, _f(c.score), c.reason, [c.spec.enabled, c.spec.block_size], _f(c.tau_hat),
            sorted((k, _f(v)) for k, v in c.detail.items())]


def run(fleets: int, seed: int) -> str:
    """This tree's outputs on the seeded fleets, hashed, and how many Choices and decisions they hold."""
    from orchestrator.routing import router as router_mod
    from orchestrator.routing.decisions import route_request_from_hints
    from orchestrator.routing.router import SpecfleetRouter
    from orchestrator.routing.score import RouterWeights, rank
    from orchestrator.routing.stats import RoutingStats
    from workers.engine.params import SpecParams

    if not INFLIGHT_ROWS and hasattr(router_mod, "step_share"):  # every request in flight one AR row, one token
        router_mod.step_share = lambda spec, tau_hat: (1, 1.0)
        router_mod._spilled_rows = lambda route, replica_id: 1

    rng = random.Random(seed)
    h = hashlib.sha256()
    n_choices = n_decisions = 0
    for f in range(fleets):
        n_sessions = rng.choice((5, 40, 200))  # > 64 entries: tau tables read in place (from_report)
        sessions = [f"s{i}" for i in range(n_sessions)]
        teams = [f"t{i}" for i in range(max(1, n_sessions // 3))]
        reports = [_report(rng, i, sessions, teams) for i in range(rng.randint(1, 12))]
        weights = _weights(rng)
        cfg = RouterWeights(**weights)
        parsed = [_inflight(rng, RoutingStats.from_dict(d), SpecParams) for d in reports]
        router = SpecfleetRouter.__new__(SpecfleetRouter)
        router.initialize_state(weights=weights, seed=f)
        replicas = [NS(replica_id=NS(unique_id=d["replica_id"]), routing_stats=dict(d) if rng.random() < 0.95 else {},
                       node_id="n0", max_ongoing_requests=64) for d in reports]  # {}: not reported yet
        for k in range(rng.randint(1, 6)):
            hints = _request(rng, sessions, teams)
            out = [_choice(c) for c in rank(route_request_from_hints(hints), parsed, cfg)]
            n_choices += len(out)
            h.update(json.dumps(out).encode())
            pr = NS(kwargs={"route": dict(hints)}, routing_context=NS(should_backoff=False),
                    metadata=NS(session_id=hints["session_id"], internal_request_id=f"i{f}-{k}"))
            coro = router.choose_replicas(replicas, pr)
            try:
                coro.send(None)
            except StopIteration as stop:
                ranks = stop.value
            h.update(json.dumps([[r.replica_id.unique_id for r in g] for g in ranks]).encode())
            h.update(json.dumps(pr.kwargs["route"].get("decision"), sort_keys=True, default=_f).encode())
            n_decisions += 1
            if k % 2 and ranks:  # requests stay in flight on the replica Serve used: the next decisions count them
                router.on_request_routed(pr, ranks[0][0].replica_id, None)
    return json.dumps({"sha256": h.hexdigest(), "choices": n_choices, "decisions": n_decisions})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default=None, help="commit to compare with (its tree is git-archived)")
    p.add_argument("--fleets", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-here", action="store_true", help="print this tree's result only")
    p.add_argument("--no-decode-ewmas", action="store_true",
                   help="reports without the decode-step EWMAs (commits before a0d0eec do not read them)")
    p.add_argument("--no-inflight-rows", action="store_true",
                   help="requests in flight as AR rows (commits before score.step_share count them so)")
    a = p.parse_args()
    global WITH_DECODE_EWMAS, INFLIGHT_ROWS
    WITH_DECODE_EWMAS = not a.no_decode_ewmas
    INFLIGHT_ROWS = not a.no_inflight_rows
    if a.run_here or not a.against:
        print(run(a.fleets, a.seed))
        return
    root = Path(__file__).resolve().parent.parent
    mine = run(a.fleets, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "-C", str(root), "archive", a.against, "orchestrator", "workers"],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        Path(tmp, "benchmarks").mkdir()
        Path(tmp, "benchmarks", "__init__.py").write_text("")
        Path(tmp, "benchmarks", "rank_equality.py").write_text(Path(__file__).read_text())
        theirs = subprocess.run([sys.executable, "-m", "benchmarks.rank_equality", "--run-here", "--fleets",
                                 str(a.fleets), "--seed", str(a.seed)] + ["--no-decode-ewmas"] * a.no_decode_ewmas
                                + ["--no-inflight-rows"] * a.no_inflight_rows,
                                cwd=tmp, check=True, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": tmp}).stdout.strip()
    print(f"this tree: {mine}\n{a.against}: {theirs}")
    if json.loads(mine) != json.loads(theirs):
        print("DIFFERENT")
        sys.exit(1)
    print("equal")


if __name__ == "__main__":
    main()
