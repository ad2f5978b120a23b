"""The router's per-decision path: each report parsed once (ReportCache, tau tables read in place), requests in
flight kept as running sums (InFlight); decisions identical to a fresh parse of every report."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace as NS

import pytest

from orchestrator.routing.decisions import order_with_shuffled_ties, route_hints, route_request_from_hints
from orchestrator.routing import score
from orchestrator.routing.router import InFlight, SpecfleetRouter
from orchestrator.routing.score import RouterWeights, rank
from orchestrator.routing.stats import LAZY_TABLE, ReportCache, ReportedTaus, RoutingStats
from workers.engine.params import SpecParams

ROLES = ("planner", "coder", "reviewer", "tool_caller")


def random_report(rng: random.Random, rid: str, sessions: list[str], updated_at: float) -> dict:
    """A report as record_routing_stats() returns it, with tables long enough to be read in place."""
    mine = rng.sample(sessions, rng.randint(0, len(sessions) // 2))
    tau = lambda: (rng.uniform(1.0, 16.0), rng.randint(0, 400))  # noqa: E731
    blocks = rng.choice([{}, {16: 1.0}, {4: 1.1, 8: 1.3, 16: 1.6}, {8: 1.2}])
    ar = rng.uniform(5.0, 40.0)
    s = RoutingStats(
        rid, kv_free_tokens=rng.randint(0, 60_000), kv_total_tokens=rng.choice([0, 60_000]),
        num_running=rng.randint(0, 20), num_waiting=rng.randint(0, 4), max_num_seqs=rng.choice([4, 16]),
        step_ms_ar=rng.choice([None, ar]), step_ms_by_block={b: ar * f for b, f in blocks.items()},
        tau_by_session={x: tau() for x in mine}, tau_by_constrained_session={x: tau() for x in mine[:20]},
        tau_by_role={r: tau() for r in ROLES if rng.random() < 0.8},
        tau_by_team={f"t{i}": tau() for i in range(rng.choice([3, 3 * LAZY_TABLE]))},
        tau_mean=rng.choice([None, rng.uniform(1.0, 8.0)]), cached_sessions=mine[: rng.randint(0, 30)],
        block_size_default=rng.choice([16, 16, 8]), spec_available=rng.random() < 0.9,
        prefill_ms_per_token=rng.choice([None, 0.4]), updated_at=updated_at,
        step_costs=rng.choice([None, {"ar_ms": {"1": ar, "4": ar * 1.5, "16": ar * 4.0},
                                      "spec_ms": {str(k): {"1": ar * f, "4": ar * f * 2.5} for k, f in blocks.items()}}]),
    )
    return json.loads(json.dumps(s.to_dict()))  # as it travels


def random_request(rng: random.Random, k: int, sessions: list[str]) -> dict:
    sid = rng.choice(sessions + [None, f"new{k}"])
    prefix = rng.randint(0, 3000)
    return route_hints(f"r{k}", session_id=sid, role=rng.choice(ROLES + (None,)),
                       team=rng.choice([None, "t1", f"t{rng.randrange(3 * LAZY_TABLE)}"]),
                       prompt_tokens=prefix + rng.randint(1, 500), max_tokens=rng.choice([16, 128, 512]),
                       prefix_tokens=prefix, spec=rng.choice([None] * 6 + [SpecParams(True, 8), SpecParams(False)]),
                       spec_off_turns=rng.randint(0, 9))


def test_report_cache_parses_each_report_once():
    cache = ReportCache()
    d = RoutingStats("x", kv_free_tokens=5, tau_by_session={"s": (3.0, 4)}, updated_at=10.0).to_dict()
    first = cache.parsed("r0", d)
    assert first.replica_id == "r0" and first.tau_by_session.get("s") == (3.0, 4)
    assert cache.parsed("r0", d) is first  # the same dict object
    assert cache.parsed("r0", dict(d)) is first  # Serve's next broadcast: a new dict, the same report
    newer = cache.parsed("r0", {**d, "updated_at": 11.0, "kv_free_tokens": 7})
    assert newer is not first and newer.kv_free_tokens == 7
    no_time = {**d, "updated_at": 0.0}
    assert cache.parsed("r1", no_time) is cache.parsed("r1", no_time)
    assert cache.parsed("r1", dict(no_time)) is not cache.parsed("r1", no_time)  # no updated_at: by identity only
    assert cache.parsed("r2", {}) is None
    bad = {"step_ms_by_block": {"x": 1.0}, "updated_at": 3.0}  # from_dict refuses it too
    assert cache.parsed("r3", bad) is None and cache.parsed("r3", dict(bad)) is None
    for table in ([["s", [2.0, 1]]], [["s", [2.0, 1]]] * (LAZY_TABLE + 1)):  # a table that is not a dict
        with pytest.raises(ValueError):
            RoutingStats.from_dict({"replica_id": "r", "tau_by_session": table})
        assert cache.parsed("r4", {"tau_by_session": table, "updated_at": 4.0 + len(table)}) is None
    cache.keep({"r0"})
    assert len(cache) == 1


def test_reported_taus_read_like_from_dict():
    raw = {"a": [2.5, 3], "b": (4.0, 7.9), "nan": [float("nan"), 3], "short": [1.0], "text": "x", "inf": [1.0, 1e400]}
    view, eager = ReportedTaus(raw), RoutingStats.from_dict({"replica_id": "r", "tau_by_session": {
        k: v for k, v in raw.items() if k != "inf"}}).tau_by_session
    assert view == eager == {"a": (2.5, 3), "b": (4.0, 7)}
    assert all(view.get(k) == eager.get(k) for k in list(raw) + ["missing"])
    assert "a" in view and "nan" not in view and view.get("inf") is None and len(view) == 2
    with pytest.raises(KeyError):
        view["short"]
    assert ReportedTaus({1: [2.0, 3]}).get("1") == (2.0, 3)  # non-string keys: converted as from_dict does


def test_from_report_is_from_dict_for_random_reports():
    rng = random.Random(3)
    sessions = [f"s{i}" for i in range(400)]
    for i in range(30):
        d = random_report(rng, f"r{i}", sessions, 100.0 + i)
        lazy, eager = RoutingStats.from_report(d), RoutingStats.from_dict(d)
        assert lazy == eager
        assert isinstance(lazy.tau_by_team, ReportedTaus) == (len(d["tau_by_team"]) > LAZY_TABLE)


def test_the_cached_parse_ranks_exactly_like_a_fresh_parse():
    rng = random.Random(7)
    sessions = [f"s{i}" for i in range(300)]
    cache = ReportCache()
    checked = 0
    for case in range(60):
        reports = [random_report(rng, f"r{i}", sessions, 1000.0 + case) for i in range(rng.randint(1, 12))]
        inflight = [(rng.randint(0, 6), rng.randint(0, 3000)) for _ in reports]
        cfg = RouterWeights(explore=rng.choice([0.0, 0.3, 1.0]), steer_block=rng.random() < 0.8,
                            block_sizes=rng.choice([[], [2, 4, 8, 16]]), spec_probe_every=rng.choice([0, 4]))
        cached = [cache.parsed(d["replica_id"], dict(d)).with_inflight(n, kv) for d, (n, kv) in zip(reports, inflight)]
        fresh = []
        for d, (n, kv) in zip(reports, inflight):
            s = RoutingStats.from_dict(d)
            s.add_inflight([kv // n] * (n - 1) + [kv - (kv // n) * (n - 1)] if n else [])
            fresh.append(s)
        for k in range(8):
            req = route_request_from_hints(random_request(rng, k, sessions))
            assert rank(req, cached, cfg) == rank(req, fresh, cfg)
            checked += 1
        assert all(c.cached_sessions == f.cached_sessions for c, f in zip(cached, fresh))
    assert checked == 480


def test_inflight_sums_equal_a_rescan():
    rng = random.Random(11)
    led = InFlight(ttl_s=50.0)
    truth: dict[str, tuple[str, float, int]] = {}  # request -> (replica, t, kv)
    now, since = 0.0, {f"r{i}": 0.0 for i in range(4)}
    for step in range(3000):
        now += rng.uniform(0.0, 0.5)
        op = rng.random()
        rid = rng.choice(list(since))
        if op < 0.45:
            iid = f"q{rng.randrange(400)}"
            need = rng.randint(1, 900)
            led.add(rid, iid, now, need)
            truth[iid] = (rid, now, need)
        elif op < 0.7 and truth:
            iid = rng.choice(list(truth))
            where = rng.choice([None, truth[iid][0], "elsewhere"])
            got = led.pop(iid, where)
            if where in (None, truth[iid][0]):
                assert got == truth.pop(iid)[1:]
            else:
                assert got is None
        elif op < 0.8:
            since[rid] = now - rng.uniform(0.0, 30.0)  # a new report
        for r, cut in since.items():
            for iid in [i for i, (w, t, _) in truth.items() if w == r and t < now - 50.0]:
                del truth[iid]  # expired: a completion that never came
            counted = [n for w, t, n in truth.values() if w == r and t >= cut]
            assert led.unseen(r, cut, now) == (len(counted), sum(counted)), step
    for r in since:  # expired entries are dropped when a replica's entries are scanned (at its next report)
        led.unseen(r, now, now)
    assert len(led) == len(truth)


def test_the_router_decides_like_a_fresh_parse_of_every_report():
    """SpecfleetRouter as Serve drives it (new dict objects for every replica at each report, requests routed,
    spilled and completed) decides as rank() on from_dict of every report with its open requests re-counted."""
    rng = random.Random(5)
    sessions = [f"s{i}" for i in range(200)]
    router = SpecfleetRouter.__new__(SpecfleetRouter)
    router.initialize_state(weights={"explore": 0.3}, seed=1)
    t0 = 1e9  # reports from long ago: every request sent since is counted
    reps = [NS(replica_id=NS(unique_id=f"r{i}"), routing_stats=random_report(rng, f"r{i}", sessions, t0))
            for i in range(6)]
    ref_rng, open_ = random.Random(1), {}  # request -> (replica, kv tokens)
    decided = 0
    for k in range(150):
        if k % 10 == 0:  # one replica reports; Serve hands over new dicts for all of them
            i = rng.randrange(len(reps))
            reps[i].routing_stats = random_report(rng, f"r{i}", sessions, t0 + k)
            for r in reps:
                r.routing_stats = dict(r.routing_stats)
        hints = random_request(rng, k, sessions)
        fresh = []
        for r in reps:
            uid = r.replica_id.unique_id
            s = RoutingStats.from_dict({**r.routing_stats, "replica_id": uid})
            s.add_inflight([need for w, need in open_.values() if w == uid])
            fresh.append(s)
        want = order_with_shuffled_ties(rank(route_request_from_hints(hints), fresh, RouterWeights(explore=0.3)),
                                        ref_rng)
        pr = NS(kwargs={"route": dict(hints)}, metadata=NS(session_id=hints["session_id"], internal_request_id=f"i{k}"),
                routing_context=NS(should_backoff=False))
        with pytest.raises(StopIteration) as done:
            router.choose_replicas(reps, pr).send(None)  # it never awaits
        got = done.value.value
        if want:
            decided += 1
            assert [c.replica_id for c in want] == [g[0].replica_id.unique_id for g in got]
            dec = pr.kwargs["route"]["decision"]
            assert (dec["replica"], dec["reason"], dec["spec"], dec["detail"]["score"]) == (
                want[0].replica_id, want[0].reason, {"enabled": want[0].spec.enabled,
                                                     "block_size": want[0].spec.block_size}, round(want[0].score, 3))
        # Serve sends it to the best, or now and then to the second (a spill); some requests complete
        where = got[min(len(got) - 1, int(rng.random() < 0.2))][0].replica_id
        router.on_request_routed(pr, where, None)
        open_[f"i{k}"] = (where.unique_id, hints["prompt_tokens"] + hints["max_tokens"])
        if len(open_) > 12:
            iid = rng.choice(sorted(open_))
            router.on_request_completed(NS(unique_id=open_.pop(iid)[0]), iid)
    assert decided > 100


def test_reports_taken_in_at_update_replicas_are_not_parsed_in_a_decision(monkeypatch):
    """Serve calls update_replicas with the replica set whenever a replica reports: the router parses new reports
    there, so the decision after it parses nothing (and decides as on a fresh parse)."""
    rng = random.Random(7)
    sessions = [f"s{i}" for i in range(200)]
    router = SpecfleetRouter.__new__(SpecfleetRouter)
    router.initialize_state(seed=1)
    reps = [NS(replica_id=NS(unique_id=f"r{i}"), routing_stats=random_report(rng, f"r{i}", sessions, 100.0 + i))
            for i in range(5)]
    parses = []
    real = RoutingStats.from_report.__func__
    monkeypatch.setattr(RoutingStats, "from_report", classmethod(lambda cls, d: parses.append(d) or real(cls, d)))
    base, serve_calls = SpecfleetRouter.__mro__[1], []
    if base is not object:  # Serve's own update_replicas needs the state Serve's __init__ builds: a stand-in
        monkeypatch.setattr(base, "update_replicas", lambda self, replicas: serve_calls.append(len(replicas)))
    router.update_replicas(reps)
    assert len(parses) == 5 and serve_calls in ([5], [])
    reps[2].routing_stats = random_report(rng, "r2", sessions, 200.0)
    for r in reps:
        r.routing_stats = dict(r.routing_stats)  # Serve's next broadcast: new dicts for every replica
    router.take_reports(reps)
    assert len(parses) == 6  # only the new report
    hints = random_request(rng, 0, sessions)
    pr = NS(kwargs={"route": dict(hints)}, metadata=NS(session_id=hints["session_id"], internal_request_id="i0"),
            routing_context=NS(should_backoff=False))
    def no_step_times(*_a, **_k):
        raise AssertionError("step times computed in the decision")

    # the intake built every replica's step model too (score.prepare); a client spec would compute its own block's
    monkeypatch.setattr(score, "step_times", no_step_times)
    pr.kwargs["route"]["spec"] = None
    hints["spec"] = None
    with pytest.raises(StopIteration) as done:
        router.choose_replicas(reps, pr).send(None)
    assert len(parses) == 6  # the decision parsed nothing
    monkeypatch.undo()
    fresh = [RoutingStats.from_dict({**r.routing_stats, "replica_id": r.replica_id.unique_id}) for r in reps]
    want = rank(route_request_from_hints(hints), fresh, RouterWeights())
    assert want and [c.replica_id for c in want] == [g[0].replica_id.unique_id for g in done.value.value][: len(want)]


def test_rank_with_prepared_step_models_is_rank():
    """rank(..., models=prepare(...)) gives what rank computes itself; models for other replicas are refused."""
    rng = random.Random(11)
    sessions = [f"s{i}" for i in range(100)]
    cfg = RouterWeights(spec_margin=0.9)
    for k in range(40):
        stats = [RoutingStats.from_report(random_report(rng, f"r{i}", sessions, 5.0)) for i in range(5)]
        req = route_request_from_hints(random_request(rng, k, sessions))
        got, want = rank(req, stats, cfg, score.prepare(stats, cfg)), rank(req, stats, cfg)
        assert [(c.replica_id, c.score, c.reason, c.spec, c.tau_hat, c.detail) for c in got] == [
            (c.replica_id, c.score, c.reason, c.spec, c.tau_hat, c.detail) for c in want]
    with pytest.raises(ValueError):
        rank(req, stats, cfg, score.prepare(stats[:2], cfg))
