"""Each replica's start-up step-cost table and decode-step EWMAs, from its routing-stats report to /metrics
(orchestrator/fleet.py fleet_stats, orchestrator/metrics.py), to the run folder (benchmarks/replica_stats.py,
router_compare's scrape), to the simulator validation's step model when no --step-costs is given
(benchmarks/validate.py)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks import acceptance_tables, replica_stats, validate
from benchmarks.router_compare import scrape_metrics
from benchmarks.simulator import sessions_from_trace
from benchmarks.stepmodel import TableStepModel
from benchmarks.workload import WorkloadConfig, generate, save
from orchestrator.fleet import ReplicaSeen, fleet_stats, fleet_view
from orchestrator.metrics import Metrics
from orchestrator.routing.stats import RoutingStats
from simulated_runs import POLICIES, write_policy_runs

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
FAST = {"ar_ms": {"1": 10.0, "4": 16.0, "16": 40.0},
        "spec_ms": {"4": {"1": 14.0, "4": 30.0, "16": 90.0}, "16": {"1": 30.0, "4": 70.0, "16": 250.0}}}
SLOW = {"ar_ms": {"1": 20.0, "4": 30.0, "16": 75.0},
        "spec_ms": {"4": {"1": 26.0, "4": 58.0, "16": 170.0}, "16": {"1": 55.0, "4": 140.0, "16": 480.0}}}


def _report(rid: str, table: dict | None, **kw) -> dict:
    """A replica's routing-stats report as the real one is built (RoutingStats.to_dict of the engine's stats)."""
    return RoutingStats(rid, kv_free_tokens=100, kv_total_tokens=200, num_running=3, step_costs=table, **kw).to_dict()


def _metrics_text(reports: dict[str, dict]) -> str:
    live = [ReplicaSeen(rid, "n1", 4, fleet_stats(rid, d)) for rid, d in reports.items()]
    m = Metrics()
    m.fleet(fleet_view(len(live), live, set()))
    return m.render()[0].decode()


def test_fleet_stats_carry_the_table_and_the_decode_ewmas():
    st = fleet_stats("r0", _report("r0", FAST, decode_ms=21.5, decode_rows=17.0, decode_tokens=15.5))
    assert (st.decode_ms, st.decode_rows, st.decode_tokens) == (21.5, 17.0, 15.5)
    assert st.step_costs.to_dict()["spec_ms"] == FAST["spec_ms"] and st.kv_free_tokens == 100
    # a malformed table or EWMA reads as not reported; the rest of the report still counts
    bad = {**_report("r1", None), "step_costs": [1, 2], "decode_ms": "fast", "decode_rows": float("nan"),
           "decode_tokens": True}
    st = fleet_stats("r1", bad)
    assert st is not None and st.kv_free_tokens == 100
    assert (st.step_costs, st.decode_ms, st.decode_rows, st.decode_tokens) == (None, None, None, None)


def test_metrics_show_them_and_the_harness_reads_them_back():
    text = _metrics_text({"r0": _report("r0", FAST, decode_ms=21.5, decode_rows=17.0, decode_tokens=15.5),
                          "r1": _report("r1", None)})  # r1: a mock engine, nothing measured
    assert 'specfleet_replica_step_cost_ms{batch="4",block="16",replica="r0"} 70.0' in text or \
        'specfleet_replica_step_cost_ms{replica="r0",block="16",batch="4"} 70.0' in text
    assert 'specfleet_replica_decode_step_rows{replica="r0"} 17.0' in text
    assert 'replica="r1"' not in "\n".join(ln for ln in text.splitlines() if ln.startswith("specfleet_replica_"))
    got = replica_stats.parse_metrics(text)
    assert set(got) == {"r0"}
    assert got["r0"] == {"decode_ms": 21.5, "decode_rows": 17.0, "decode_tokens": 15.5, "step_costs": FAST}


async def test_the_scrape_keeps_the_latest_per_replica_and_the_gauges_over_time(tmp_path):
    texts = [_metrics_text({"r0": _report("r0", FAST, decode_ms=20.0, decode_rows=4.0, decode_tokens=4.0)}),
             _metrics_text({"r0": _report("r0", FAST, decode_ms=30.0, decode_rows=9.0, decode_tokens=6.0)})]
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, text=texts[min(len(calls), 2) - 1])

    rows, stats = [], {}
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
        await scrape_metrics(client, 0.0, rows, stats)
        await scrape_metrics(client, 0.0, rows, stats)
    assert calls == ["/metrics", "/metrics"]
    assert [r["r0"]["replica_decode_step_rows"] for r in rows] == [4.0, 9.0]  # the EWMAs over time
    assert stats["replicas"]["r0"]["decode_ms"] == 30.0 and stats["replicas"]["r0"]["step_costs"] == FAST
    replica_stats.save(tmp_path / "p.replica_stats.json", stats["replicas"], stats["t_s"])
    assert replica_stats.load(tmp_path / "p.replica_stats.json") == stats["replicas"]


def test_saved_tables_become_step_models(tmp_path):
    path = tmp_path / "pow2.replica_stats.json"
    replica_stats.save(path, {"a": {"step_costs": FAST}, "b": {"decode_ms": 3.0}}, 12.0)
    m = replica_stats.step_models(path, ["a"], 0.5, 2.0)["a"]
    assert m.spec_s(4, 16, 64) == pytest.approx(0.070) and m.ar_s(16, 900) == pytest.approx(0.040)
    assert m.prefill_s(100) == pytest.approx(0.052) and "replica a" in m.source
    with pytest.raises(ValueError, match="replica b has no saved step-cost table"):
        replica_stats.step_models(path, ["a", "b"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a replica_stats JSON"):
        replica_stats.load(tmp_path / "x.json")


# ------------------------------------------------------------------ validation on a run folder's own tables
def _acceptance_json(path: Path, drafter: str, taus: dict[str, float]) -> str:
    """benchmarks/acceptance.py's JSON form, greedy."""
    by_cat = {c: {"tau": t, "passes": 100, "accept_by_position": []} for c, t in taus.items()}
    path.write_text(json.dumps({"drafter": drafter, "block_size": 16,
                                "results": [{"temperature": 0.0, "by_category": by_cat, "tau": 2.0}]}))
    return str(path)


def _fake_run(tmp_path: Path, tables: dict[str, dict], kv: dict[str, float], seed: int = 5) -> tuple[Path, list]:
    """A router_compare single-run folder whose 'measurements' are simulator runs of replicas with these step
    tables (no prefill cost: the saved start-up tables do not time it), each run's tables saved as the harness
    saves them; and the --acceptance arguments of its drafters."""
    cfg = yaml.safe_load((CONFIGS / "cpu_fleet_specialised.yaml").read_text())
    d = tmp_path / "run"
    d.mkdir()
    wcfg = WorkloadConfig(teams=3, seed=seed)
    trace = generate(wcfg)
    save(d / "trace.jsonl", wcfg, trace)
    names = sorted(kv, key=lambda r: -kv[r])
    step = {i: TableStepModel({64: tables[n]}, 0.0) for i, n in enumerate(names)}
    roles = ("coder", "tool_caller", "reviewer", "planner")
    code = _acceptance_json(tmp_path / "code.json", "models/smollm2-135m-dflash-b16-code",
                            dict(zip(roles, (6.0, 7.0, 5.0, 1.5))))
    chat = _acceptance_json(tmp_path / "chat.json", "models/smollm2-135m-dflash-b16-chat",
                            dict(zip(roles, (1.5, 1.3, 2.0, 6.0))))
    alphas = {0: acceptance_tables.read(code).alpha_by_role, 1: acceptance_tables.read(chat).alpha_by_role}
    sessions = [{**x, "session_id": "srv-" + x["session_id"]} for x in sessions_from_trace(trace)]
    write_policy_runs(d, cfg, kv, step, alphas, sessions)
    for policy in POLICIES:
        replica_stats.save(d / f"{policy}.replica_stats.json",
                           {rid: {"step_costs": tables[rid], "decode_ms": 20.0} for rid in kv}, 60.0)
    return d, ["--acceptance", f"code={code}", "--acceptance", f"chat={chat}"]


def test_validation_takes_the_runs_own_tables_without_step_cost_files(tmp_path):
    kv = {"idA": 8192.0, "idB": 6816.0}
    run, acc = _fake_run(tmp_path, {"idA": SLOW, "idB": FAST}, kv)
    out = tmp_path / "v.json"
    assert validate.main(["--run", str(run), "--seeds", "1", "--out", str(out), *acc]) == 0
    v = json.loads(out.read_text())
    rows = v["trials"][0]["rows"]
    assert len(rows) == 3 and all(abs(r["error_pct"]) <= 0.1 for r in rows), rows
    assert v["step_costs_source"] == ["pow2.replica_stats.json: replica idA's start-up calibration",
                                      "pow2.replica_stats.json: replica idB's start-up calibration"]
    assert v["prefill_ms"] == {"per_token": 0.0, "fixed": 0.0}
    # each replica's own table, by its id: the tables swapped between the replicas are another fleet
    (run / "pow2.replica_stats.json").write_text((run / "pow2.replica_stats.json").read_text()
                                                 .replace('"idA"', '"tmp"').replace('"idB"', '"idA"')
                                                 .replace('"tmp"', '"idB"'))
    assert validate.main(["--run", str(run), "--seeds", "1", "--out", str(out), *acc]) == 0
    assert any(abs(r["error_pct"]) > 1.0 for r in json.loads(out.read_text())["trials"][0]["rows"])
    with pytest.raises(SystemExit):
        validate.main(["--run", str(run), "--prefill-ms-per-token", "-1"])
    (run / "pow2.replica_stats.json").unlink()  # no saved tables and no --step-costs: a clear error
    with pytest.raises(SystemExit):
        validate.main(["--run", str(run), "--seeds", "1", *acc])
