"""Issue 15's measurement harness without engines or Ray: trials and their spread, policy configs (baselines'
speculation pinned, statics forced through the config), drafter paths, replica labels, the never-slower ratio,
the fleet configs, the markdown tables and the plots. The runs themselves are replaced by fakes here; the
serving stack is exercised by the mock smoke runs in docs/evidence.md's runbook."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import never_slower as ns
from benchmarks import router_compare as rc
from benchmarks.fleet_labels import entries, label_replicas
from benchmarks.report import render
from benchmarks.trials import aggregate, spread, tau_by_replica_role
from benchmarks.workload import WorkloadConfig, add_workload_args, config_from_args, generate, teams_for
from orchestrator.config import ServeConfig

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def _cfg(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _workload_args(**kw) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_workload_args(ap)
    a = ap.parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


# ------------------------------------------------------------------ workload flags
def test_workload_flags_give_the_generators_config_and_reject_bad_input():
    a = _workload_args(teams=4, seed=9)
    assert generate(config_from_args(a)) == generate(WorkloadConfig(teams=4, seed=9))
    assert config_from_args(a, seed=3, teams=7).seed == 3 and config_from_args(a, seed=3, teams=7).teams == 7
    half = config_from_args(_workload_args(max_tokens_scale=0.5))
    assert half.max_tokens == {"planner": 48, "coder": 64, "reviewer": 48, "tool_caller": 24}
    for bad in (dict(mix="poet=1"), dict(mix="coder"), dict(mix="coder=0"), dict(turns=(3, 2)), dict(think=(1.0, 0.5))):
        with pytest.raises(ValueError):
            config_from_args(_workload_args(**bad))
    assert teams_for(48, 3) == 16 and teams_for(4, 3) == 2 and teams_for(1, 3) == 1


# ------------------------------------------------------------------ trials
def test_spread_and_pooled_tau():
    assert spread([3.0, 1.0, 2.0, None, float("nan")]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3,
                                                            "values": [3.0, 1.0, 2.0]}
    assert spread([])["median"] is None
    recs = [dict(status=200, replica="x", role="coder", spec_passes=10, spec_tokens=40),
            dict(status=200, replica="x", role="coder", spec_passes=30, spec_tokens=40),  # pooled: 80 / 40
            dict(status=200, replica="y", role="planner", spec_passes=0, spec_tokens=0),  # AR turn: no tau
            dict(status=429, replica="y", role="planner", spec_passes=5, spec_tokens=50)]  # refused: not counted
    assert tau_by_replica_role(recs, {"x": "r0:code"}) == {"r0:code": {"coder": {"tau": 2.0, "passes": 40}}}


def _summary(good, tpot=100.0, tau=None):
    return {"goodput_tps": good, "ttft_p50_s": 0.1, "ttft_p99_s": 0.5, "tpot_p50_ms": 50.0, "tpot_p99_ms": tpot,
            "rejected_429": 0, "oom_events": 0, "errors": 0, "completed": 10, "requests": 10, "tokens": 100,
            "tau_by_replica_role": tau or {}}


def test_aggregate_takes_ratios_per_trial_and_skips_failed_runs():
    trials = [{"seed": 1, "policies": {"specfleet": _summary(30.0, 90.0, {"r0:a": {"coder": {"tau": 3.0}}}),
                                       "pow2": _summary(20.0, 100.0)}},
              {"seed": 2, "policies": {"specfleet": _summary(20.0, 100.0, {"r0:a": {"coder": {"tau": 5.0}}}),
                                       "pow2": _summary(10.0, 50.0)}},
              {"seed": 3, "policies": {"specfleet": _summary(99.0), "pow2": {"failed": "RuntimeError: no Ray"}}}]
    agg = aggregate(trials)
    assert agg["policies"]["specfleet"]["goodput_tps"]["values"] == [30.0, 20.0, 99.0]
    assert agg["policies"]["pow2"]["failed"] == 1 and agg["policies"]["pow2"]["goodput_tps"]["n"] == 2
    r = agg["ratios"]["specfleet/pow2"]
    assert r["goodput"]["values"] == [1.5, 2.0]  # per trial, the failed trial left out
    assert r["tpot_p99"]["values"] == [0.9, 2.0]
    assert agg["policies"]["specfleet"]["tau_by_replica_role"]["r0:a"]["coder"]["median"] == 4.0


# ------------------------------------------------------------------ router_compare configs and trials
def test_baselines_run_pinned_speculation_and_specfleet_steers():
    cfg = _cfg("mock_fleet.yaml")
    sf = rc.policy_config(cfg, "specfleet")
    assert sf["router"]["policy"] == "specfleet" and "weights" not in sf["router"]
    for base in ("pow2", "consistent_hash"):
        w = ServeConfig.model_validate(rc.policy_config(cfg, base)).router.weights
        assert not w.steer_spec and not w.steer_block
        assert ServeConfig.model_validate(rc.policy_config(cfg, base, "steered")).router.weights.steer_spec
    assert "router" not in cfg  # the caller's config is not changed
    with pytest.raises(ValueError):
        rc.policy_config(cfg, "random")


def test_drafter_paths_are_resolved_and_a_missing_one_stops_the_run(tmp_path):
    cfg = _cfg("cpu_fleet_specialised.yaml")
    general = rc.run_meta.REPO_ROOT / "models" / "smollm2-135m-dflash-b16"
    present = (general / "config.json").is_file()
    if not all((rc.run_meta.REPO_ROOT / s["drafter"] / "config.json").is_file() for s in cfg["replicas"]):
        with pytest.raises(ValueError, match="drafter-fallback"):
            rc.resolve_drafters(cfg)
    if present:
        fixed, subs = rc.resolve_drafters(cfg, fallback="models/smollm2-135m-dflash-b16")
        assert fixed["model"]["drafter"] == str(general)
        for spec, orig in zip(fixed["replicas"], cfg["replicas"]):
            assert Path(spec["drafter"]).is_absolute() and Path(spec["drafter"], "config.json").is_file()
            if not (rc.run_meta.REPO_ROOT / orig["drafter"] / "config.json").is_file():
                assert subs[str(rc.run_meta.REPO_ROOT / orig["drafter"])] == str(general)
    with pytest.raises(ValueError):
        rc.resolve_drafters({"engine": "real", "replicas": [{"drafter": str(tmp_path / "nope")}]})
    mock = _cfg("mock_fleet.yaml")
    assert rc.resolve_drafters(mock) == (mock, {})


def test_load_config_checks_first_and_warns_for_every_stand_in(tmp_path, capsys):
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    (fallback / "config.json").write_text("{}")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"engine": "real", "replicas": [{"count": 1, "drafter": str(tmp_path / "nope")}]}))
    cfg, subs = rc.load_config(str(path), str(fallback))
    assert subs == {str(tmp_path / "nope"): str(fallback)} and cfg["replicas"][0]["drafter"] == str(fallback)
    assert f"WARNING: drafter {tmp_path / 'nope'} does not exist; {fallback} stands in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exactly one replica"):  # the caller's check (never_slower: one replica)
        rc.load_config(str(CONFIGS / "mock_fleet.yaml"), check=lambda c: ns.check_base(c, 16))
    with pytest.raises(SystemExit) as e:
        ns.main(["--config", str(CONFIGS / "mock_fleet.yaml"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()


def test_seeds_trials_and_rotation():
    assert rc.parse_seeds(None, None) is None
    assert rc.parse_seeds(None, 3) == [0, 1, 2] and rc.parse_seeds("11,12", None) == [11, 12]
    for seeds, trials in (("1,1", None), ("1,2", 3), ("x", None), (None, 0)):
        with pytest.raises(ValueError):
            rc.parse_seeds(seeds, trials)
    pols = ["specfleet", "pow2", "consistent_hash"]
    assert [rc.rotated(pols, k)[0] for k in range(4)] == ["specfleet", "pow2", "consistent_hash", "specfleet"]


def _compare_args(**kw):
    a = _workload_args(teams=2, **kw)
    a.concurrency, a.duration_s, a.baseline_spec, a.omp_threads, a.argv = 4, 10.0, "fixed", 1, ["--test"]
    return a


def test_run_trials_one_trace_per_seed_every_policy_on_it(tmp_path):
    seen: dict = {}

    def fake_run(policy, cfg, trace, args, out):
        seen.setdefault(out.name, []).append((policy, [s.session_id for s in trace]))
        if policy == "consistent_hash" and out.name == "seed8":
            raise RuntimeError("specfleet serve exited with 1")
        good = {"specfleet": 30.0, "pow2": 20.0, "consistent_hash": 15.0}[policy]
        return {**_summary(good, tau={"r0:x": {"coder": {"tau": 2.0, "passes": 4}}}), "policy": policy}

    pols = ["specfleet", "pow2", "consistent_hash"]
    summary = rc.run_trials(_cfg("mock_fleet.yaml"), [7, 8], pols, _compare_args(), tmp_path, run=fake_run)
    assert [p for p, _ in seen["seed7"]] == pols and [p for p, _ in seen["seed8"]] == pols[1:] + pols[:1]
    for runs in seen.values():  # one trace per trial, the same for every policy
        assert len({tuple(ids) for _, ids in runs}) == 1
    assert seen["seed7"][0][1] != seen["seed8"][0][1]
    assert (tmp_path / "seed7" / "trace.jsonl").is_file()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["kind"] == "router_compare_trials" and on_disk["seeds"] == [7, 8]
    assert on_disk["policies"]["consistent_hash"]["failed"] == 1
    assert on_disk["ratios"]["specfleet/pow2"]["goodput"]["values"] == [1.5, 1.5]
    assert on_disk["meta"]["command"].endswith("--test") and on_disk["meta"]["loadavg_start"]
    table = render(on_disk)
    assert "| specfleet | 30.00 |" in table and "| pow2 | 20.00 | 1.50 |" in table and "r0:x" in table


def test_router_compare_refuses_bad_arguments_before_starting_anything(tmp_path, capsys):
    cfg = str(CONFIGS / "mock_fleet.yaml")
    for argv in (["--config", cfg, "--out", str(tmp_path)],  # neither --trace nor --seeds
                 ["--config", cfg, "--seeds", "1,2", "--trace", "t.jsonl", "--out", str(tmp_path)],
                 ["--config", cfg, "--seeds", "1", "--mix", "poet=1", "--out", str(tmp_path)],
                 ["--config", cfg, "--seeds", "1", "--policies", "random", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            rc.main(argv)
        assert e.value.code == 2
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ never slower
def test_never_slower_forces_the_statics_through_the_config_or_the_request():
    cfg = _cfg("cpu_single_general.yaml")
    ns.check_base(cfg, 16)
    ar, extra = ns.policy_run(cfg, "ar", "config")
    sc = ServeConfig.model_validate(ar)
    assert extra is None and all(e.drafter is None for e in entries(sc))
    d16, extra = ns.policy_run(cfg, "dflash_b16", "config")
    w = ServeConfig.model_validate(d16).router.weights
    assert extra is None and not w.steer_spec and not w.steer_block
    sf, extra = ns.policy_run(cfg, "specfleet", "config")
    assert extra is None and ServeConfig.model_validate(sf).router.weights.steer_spec
    for p in ns.POLICIES:
        assert ServeConfig.model_validate(ns.policy_run(cfg, p, "config")[0]).router.policy == "specfleet"
    same_cfg = ns.policy_run(cfg, "specfleet", "request")[0]
    assert ns.policy_run(cfg, "ar", "request") == (same_cfg, {"spec": {"enabled": False}})
    assert ns.policy_run(cfg, "dflash_b16", "request")[1] == {"spec": {"enabled": True, "block_size": 16}}
    from orchestrator.api.schemas import SpecRequest

    SpecRequest.model_validate({"enabled": True, "block_size": 16})  # what the request mode sends is valid API input
    fleet = _cfg("cpu_fleet_specialised.yaml")
    with pytest.raises(ValueError, match="exactly one replica"):
        ns.check_base(fleet, 16)
    with pytest.raises(ValueError, match="no drafter"):
        ns.check_base({**cfg, "model": {**cfg["model"], "drafter": None}}, 16)
    with pytest.raises(ValueError, match="block size"):
        ns.check_base(cfg, 8)
    ns.check_base(_cfg("mock_single.yaml"), 16)


def test_never_slower_ratio_is_per_seed_against_the_better_static():
    def trial(ar, d16, sf):
        return {"policies": {"ar": _summary(ar), "dflash_b16": _summary(d16), "specfleet": _summary(sf)}}

    lev = ns.level_summary([trial(100.0, 50.0, 96.0), trial(40.0, 80.0, 70.0), trial(10.0, 10.0, 11.0)])
    assert lev["ratio"]["values"] == [0.96, 0.875, 1.1] and lev["ratio"]["median"] == 0.96 and lev["goal_met"]
    assert not ns.level_summary([trial(100.0, 50.0, 90.0)])["goal_met"]
    failed = ns.level_summary([{"policies": {"ar": {"failed": "x"}, "dflash_b16": _summary(1.0),
                                             "specfleet": _summary(1.0)}}])
    assert failed["ratio"]["n"] == 0 and failed["goal_met"] is None


def test_never_slower_runs_every_policy_on_one_trace_per_level(tmp_path):
    calls = []

    def fake_replay(name, cfg, trace, concurrency, duration_s, out, **kw):
        calls.append((name, concurrency, len(trace), tuple(s.session_id for s in trace), kw["extra_body"]))
        good = {"ar": 100.0, "dflash_b16": 60.0, "specfleet": 97.0}[name] * concurrency
        return _summary(good)

    a = _workload_args()
    a.sessions_per_client, a.static_via, a.block, a.duration_s, a.port = 2, "request", 16, 5.0, 1
    a.startup_timeout_s, a.omp_threads, a.argv = 10.0, 1, []
    summary = ns.run(_cfg("mock_single.yaml"), [1, 4], [5], list(ns.POLICIES), a, tmp_path, replay=fake_replay)
    for c in (1, 4):
        runs = [x for x in calls if x[1] == c]
        assert sorted(x[0] for x in runs) == sorted(ns.POLICIES) and len({x[3] for x in runs}) == 1
        assert runs[0][2] >= 2 * c  # sessions = sessions_per_client x concurrency (whole teams)
    assert {x[0]: x[4] for x in calls} == {"ar": {"spec": {"enabled": False}}, "specfleet": None,
                                          "dflash_b16": {"spec": {"enabled": True, "block_size": 16}}}
    assert summary["levels"]["4"]["ratio"]["median"] == 0.97 and summary["levels"]["4"]["goal_met"]
    assert json.loads((tmp_path / "summary.json").read_text())["kind"] == "never_slower"
    table = render(summary)
    assert "| 1 | 100.00 | 60.00 | 97.00 | 0.970 | yes |" in table


# ------------------------------------------------------------------ fleets and labels
def test_specialised_fleet_config():
    sc = ServeConfig.model_validate(_cfg("cpu_fleet_specialised.yaml"))
    assert sc.engine == "real" and sc.num_replicas == 2 and sc.model.dtype == "auto" and sc.model.block_size == 16
    drafters = [s.drafter for s in sc.fleet()]
    assert drafters == ["models/smollm2-135m-dflash-b16-code", "models/smollm2-135m-dflash-b16-chat"]
    assert len({s.kv_cache_bytes for s in sc.fleet()}) == 2  # told apart in /metrics by KV
    assert all(s.tp == 1 and s.calibrate_step_costs for s in sc.fleet())
    ecfg = sc.engine_config(sc.fleet()[0], "/t", "/d")
    assert ecfg.dtype == "auto" and ecfg.calibrate_step_costs and ecfg.spec_block_size == 16


def test_replicas_are_labelled_by_kv_order():
    cfg = ServeConfig.model_validate(_cfg("cpu_fleet_specialised.yaml"))
    rows = [{"t": 0.0, "aaa": {"kv_total_tokens": 6816.0}, "bbb": {"kv_total_tokens": 8192.0}},
            {"t": 2.0, "aaa": {"kv_total_tokens": 6816.0, "kv_free_tokens": 10.0}}]
    labels, ambiguous = label_replicas(cfg, rows)
    assert labels == {"bbb": "r0:smollm2-135m-dflash-b16-code", "aaa": "r1:smollm2-135m-dflash-b16-chat"}
    assert not ambiguous
    same = ServeConfig.model_validate({**_cfg("cpu_fleet_specialised.yaml"),
                                       "replicas": [{"count": 2, "kv_cache_bytes": 1 << 27}]})
    assert label_replicas(same, rows)[1]
    assert label_replicas(cfg, rows[:1] + [{"t": 4.0, "ccc": {"kv_total_tokens": 1.0}}])[1]  # 3 replicas seen


# ------------------------------------------------------------------ plots
def test_plots_from_summaries(tmp_path):
    pytest.importorskip("matplotlib")  # the [bench] extra; CI's venv installs [test] only
    from benchmarks import plots

    trials = [{"seed": s, "policies": {p: {**_summary(g + s, tau={"r0:code": {"coder": {"tau": 2.0 + s}}}),
                                           "policy": p} for p, g in (("specfleet", 30.0), ("pow2", 20.0))}}
              for s in (1, 2)]
    compare = {"kind": "router_compare_trials", "meta": {"started": "2026-12-03 10:00:00 UTC", "loadavg_start": "1.0"},
               "trials": trials, **aggregate(trials)}
    assert plots.goodput_spread(compare, tmp_path / "g.png", "t").stat().st_size > 1000
    assert plots.tau_by_replica_role(compare, tmp_path / "tau.png", "t").stat().st_size > 1000
    lev = {"policies": aggregate([{"policies": {"ar": _summary(10.0), "specfleet": _summary(9.8)}}])["policies"],
           "ratio": spread([0.98])}
    never = {"kind": "never_slower", "policies": ["ar", "specfleet"], "seeds": [1], "goal": 0.95,
             "levels": {"1": lev, "4": lev, "16": lev}}
    assert plots.never_slower_curve(never, tmp_path / "ns.png", "t").stat().st_size > 1000
    with pytest.raises(SystemExit):
        plots.main(["--out", str(tmp_path)])
