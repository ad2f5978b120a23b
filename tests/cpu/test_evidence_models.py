"""Issue 15's simulator inputs and checks: the measured step-cost table as a step model, acceptance JSONs as
per-role alphas, the validation of the simulator against a run (here a run the simulator itself produced, written
as router_compare writes a real one: validation must then find no error), and the B300 projection's measured-
acceptance path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import acceptance_tables, project_b300, validate
from benchmarks.simulator import sessions_from_trace
from benchmarks.stepmodel import LinearStepModel, TableStepModel, interp, load_step_model
from benchmarks.workload import WorkloadConfig, generate, save
from orchestrator.config import ServeConfig
from orchestrator.routing.score import alpha_from_tau
from simulated_runs import write_policy_runs

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
TABLE = {"64": {"ar_ms": {"1": 10.0, "4": 16.0, "16": 40.0},
                "spec_ms": {"4": {"1": 14.0, "4": 30.0, "16": 90.0}, "16": {"1": 30.0, "4": 70.0, "16": 250.0}}},
         "512": {"ar_ms": {"1": 12.0, "16": 50.0}, "spec_ms": {"16": {"1": 34.0, "16": 280.0}}}}


# ------------------------------------------------------------------ step model
def test_table_step_model_reads_the_measured_table():
    m = TableStepModel(TABLE, prefill_ms_per_token=0.5, prefill_ms_fixed=4.0)
    assert m.ar_s(4, 64) == pytest.approx(0.016) and m.spec_s(16, 16, 64) == pytest.approx(0.250)  # measured points
    assert m.ar_s(2, 64) == pytest.approx(0.012)  # between batches 1 and 4
    assert m.ar_s(32, 64) == pytest.approx(0.040 + 16 * 0.002)  # the last segment's slope
    assert m.spec_s(1, 8, 64) == pytest.approx(0.014 + (0.030 - 0.014) * 4 / 12)  # between blocks 4 and 16
    assert m.spec_s(4, 2, 64) == pytest.approx(0.016 + (0.030 - 0.016) / 3)  # block 1 is the AR step
    assert m.ar_s(1, 0) == m.ar_s(1, 64) and m.ar_s(1, 288) == pytest.approx(0.011)  # between contexts
    assert m.prefill_s(100) == pytest.approx(0.054) and m.prefill_s(0) == 0.0
    assert m.scaled(2.0).spec_s(4, 16, 64) == pytest.approx(0.140)
    assert interp([1, 4], [5.0, 2.0], 10) == 2.0  # a falling last segment is not extrapolated downwards
    with pytest.raises(ValueError):
        TableStepModel({}, 0.1)


def test_step_model_files(tmp_path):
    t = TableStepModel(TABLE, 0.5, 4.0, source="calibrate")
    (tmp_path / "t.json").write_text(json.dumps({**t.to_dict(), "meta": {"loadavg_start": "0.1"}}))
    back = load_step_model(tmp_path / "t.json")
    assert isinstance(back, TableStepModel) and back.spec_s(4, 4, 64) == t.spec_s(4, 4, 64)
    LinearStepModel(0.01, 0.001, 0.02, 0.0001, 0.0002).save(tmp_path / "l.json")
    assert isinstance(load_step_model(tmp_path / "l.json"), LinearStepModel)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError):
        load_step_model(tmp_path / "x.json")


# ------------------------------------------------------------------ acceptance files
def _acceptance_json(path: Path, drafter: str, taus: dict[str, float], temperature: float = 0.0) -> str:
    by_cat = {c: {"tau": t, "passes": 100, "accept_by_position": []} for c, t in taus.items()}
    path.write_text(json.dumps({"drafter": drafter, "block_size": 16,
                                "results": [{"temperature": temperature, "by_category": by_cat, "tau": 2.0},
                                            {"temperature": 1.0, "by_category": {}, "tau": 1.0}]}))
    return str(path)


def test_acceptance_files_become_alphas(tmp_path):
    p = _acceptance_json(tmp_path / "code.json", "models/x-code", {"coder": 5.0, "tool_caller": 6.0, "math": 2.0})
    acc = acceptance_tables.parse_spec(f"code={p}")
    assert acc.label == "code" and acc.block == 16 and acc.drafter == "models/x-code"
    assert acc.alpha_by_role["coder"] == alpha_from_tau(5.0, 16)
    alphas, filled = acc.for_roles()
    assert sorted(filled) == ["planner", "reviewer"]
    assert alphas["planner"] == pytest.approx((alpha_from_tau(5.0, 16) + alpha_from_tau(6.0, 16)) / 2)
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"_meta": {"tau_a": {"coder": 3.0}, "drafter_a": "/d/a", "block_a": 16},
                             "a": {"coder": 0.7}, "b": {"coder": 0.4}}))
    assert acceptance_tables.parse_spec(f"x={m}#b").alpha_by_role == {"coder": 0.4}
    for bad in ("nolabel", f"x={m}", f"x={m}#c", f"x={tmp_path}/missing.json", f"x={p}"):
        with pytest.raises(ValueError):
            acc = acceptance_tables.parse_spec(bad, temperature=0.5 if bad.endswith("code.json") else 0.0)


# ------------------------------------------------------------------ validation
def _fake_run(tmp_path: Path, cfg: dict, step, alphas, kv: dict[str, float], seed: int) -> Path:
    """A router_compare trials folder whose 'measurements' are simulator runs on the given fleet, with Serve-like
    replica ids and server session ids (session hashing keys on those)."""
    run = tmp_path / "run"
    d = run / f"seed{seed}"
    d.mkdir(parents=True)
    wcfg = WorkloadConfig(teams=3, seed=seed)
    trace = generate(wcfg)
    save(d / "trace.jsonl", wcfg, trace)
    sessions = [{**x, "session_id": "srv-" + x["session_id"]} for x in sessions_from_trace(trace)]
    write_policy_runs(d, cfg, kv, step, alphas, sessions)
    (run / "summary.json").write_text(json.dumps({"kind": "router_compare_trials", "trials": [{"seed": seed}]}))
    return run


def test_validation_of_a_real_fleet_run_against_itself_finds_no_error(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "cpu_fleet_specialised.yaml").read_text())
    step = TableStepModel(TABLE, 0.5, 4.0)
    (tmp_path / "steps.json").write_text(json.dumps(step.to_dict()))
    code = _acceptance_json(tmp_path / "code.json", "models/smollm2-135m-dflash-b16-code",
                            {"coder": 6.0, "tool_caller": 7.0, "reviewer": 5.0, "planner": 1.5})
    chat = _acceptance_json(tmp_path / "chat.json", "models/smollm2-135m-dflash-b16-chat",
                            {"coder": 1.5, "tool_caller": 1.3, "reviewer": 2.0, "planner": 6.0})
    alphas = {0: acceptance_tables.read(code).alpha_by_role, 1: acceptance_tables.read(chat).alpha_by_role}
    run = _fake_run(tmp_path, cfg, step, alphas, {"idA": 8192.0, "idB": 6816.0}, seed=4)
    out = tmp_path / "validation.json"
    assert validate.main(["--run", str(run), "--step-costs", str(tmp_path / "steps.json"), "--acceptance",
                          f"code={code}", "--acceptance", f"chat={chat}", "--seeds", "1", "--out", str(out)]) == 0
    v = json.loads(out.read_text())
    assert v["kind"] == "validation" and v["trials"][0]["trial"] == "seed 4"
    assert {r["policy"]: r["held_out"] for r in v["trials"][0]["rows"]} == {
        "specfleet": True, "pow2": False, "consistent_hash": True}
    assert all(abs(r["error_pct"]) <= 0.1 for r in v["trials"][0]["rows"]), v["trials"][0]["rows"]
    assert all(e["within_goal"] for e in v["by_policy"].values())
    assert v["trials"][0]["alphas"]["0"]["coder"] == alphas[0]["coder"]  # the code drafter on the 192 MiB replica
    # acceptance measured on the fit-on run instead of the files
    assert validate.main(["--run", str(run), "--step-costs", str(tmp_path / "steps.json"), "--seeds", "1",
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["acceptance_source"] == ["measured on the pow2 run"]
    with pytest.raises(SystemExit):  # real engines need step costs
        validate.main(["--run", str(run)])
    with pytest.raises(SystemExit):  # an acceptance file must name a drafter of the fleet
        validate.main(["--run", str(run), "--step-costs", str(tmp_path / "steps.json"), "--acceptance",
                       f"x={_acceptance_json(tmp_path / 'o.json', 'models/other', {'coder': 2.0})}"])


class _R:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_run_replicas_map_to_fleet_positions_by_kv():
    sc = ServeConfig.model_validate(yaml.safe_load((CONFIGS / "cpu_fleet_specialised.yaml").read_text()))
    rows = [{"t": 0.0, "idB": {"kv_total_tokens": 6816.0}, "idA": {"kv_total_tokens": 8192.0}}]
    pos, kv = validate.positions(sc, rows)
    assert pos == {"idA": 0, "idB": 1} and kv == [8192.0, 6816.0]
    recs = [_R(status=200, replica="idB", role="coder", spec_passes=10, spec_tokens=20),
            _R(status=200, replica="idB", role="coder", spec_passes=10, spec_tokens=60),
            _R(status=200, replica="idA", role="planner", spec_passes=0, spec_tokens=0),
            _R(status=429, replica="idA", role="planner", spec_passes=3, spec_tokens=30)]
    assert validate.measured_alpha(recs, pos, 16) == {1: {"coder": alpha_from_tau(4.0, 16)}}
    with pytest.raises(ValueError, match="saw 1 replicas"):
        validate.positions(sc, [{"t": 0.0, "idA": {"kv_total_tokens": 8192.0}}])
    one, code, chat = object(), object(), object()
    assert validate.steps_for_fleet(sc, [(None, one)]) == {0: one, 1: one}
    by_drafter = [("models/smollm2-135m-dflash-b16-chat", chat), ("models/smollm2-135m-dflash-b16-code", code)]
    assert validate.steps_for_fleet(sc, by_drafter) == {0: code, 1: chat}  # the 192 MiB replica runs the code drafter
    with pytest.raises(ValueError, match="no --step-costs file"):
        validate.steps_for_fleet(sc, [("models/a", one), ("models/b", one)])


def test_validation_of_a_mock_run_uses_the_mocks_own_model(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "mock_fleet.yaml").read_text())
    kv = {"a": 20000.0, "b": 16000.0, "c": 2500.0}
    run = _fake_run(tmp_path, cfg, None, None, kv, seed=2)
    out = tmp_path / "v.json"
    assert validate.main(["--run", str(run), "--seeds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["trials"][0]["rows"]
    assert len(rows) == 3 and all(abs(r["error_pct"]) <= 0.1 for r in rows), rows


# ------------------------------------------------------------------ projection
def test_projection_with_measured_acceptance_says_it_is_a_projection(tmp_path):
    code = _acceptance_json(tmp_path / "code.json", "models/c", {"coder": 6.0, "tool_caller": 6.0, "reviewer": 4.0})
    chat = _acceptance_json(tmp_path / "chat.json", "models/h", {"planner": 6.0, "coder": 1.5})
    out = tmp_path / "b300.json"
    assert project_b300.main(["--acceptance", f"code={code}", "--acceptance", f"chat={chat}", "--cases",
                              "qwen3-8b-8xTP1", "--concurrency", "8", "--sessions-per-level", "1", "--think", "0,0",
                              "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["kind"] == "projection" and d["statement"].startswith("PROJECTION, not a measurement")
    assert d["acceptance"]["roles_filled_with_mean"] == {"code": ["planner"], "chat": ["reviewer", "tool_caller"]}
    assert d["alphas"]["code"]["coder"] == alpha_from_tau(6.0, 16)
    assert set(d["cases"]["qwen3-8b-8xTP1"]["levels"]["8"]["routers"]) == {"specfleet", "pow2", "consistent_hash"}
    assert [project_b300.drafter_of(i, 8, ["code", "chat"]) for i in range(8)] == ["code"] * 4 + ["chat"] * 4
    assert [project_b300.drafter_of(i, 3, ["a", "b"]) for i in range(3)] == ["a", "a", "b"]
    with pytest.raises(SystemExit):
        project_b300.main(["--acceptance", f"code={code}", "--alphas", "x.json", "--out", str(out)])
