"""RoutingStats: JSON round trip, tolerance of `{}`/unknown keys, construction from EngineStats."""
from __future__ import annotations

import json

import pytest

from orchestrator.routing.stats import RoutingStats
from workers.engine.params import EngineStats


def test_round_trip_through_json():
    s = RoutingStats(
        "r0", kv_free_tokens=100, kv_total_tokens=400, vram_free_bytes=5, num_running=2,
        step_ms_ar=12.5, step_ms_by_block={8: 15.0, 16: 20.0},
        tau_by_session={"s1": (3.5, 10)}, tau_by_role={"coder": (4.0, 50)},
        tau_by_team={"t1": (3.0, 60)}, tau_mean=3.2, cached_sessions=["s1"],
    )
    back = RoutingStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert back.kv_used_frac == pytest.approx(0.75)


def test_from_dict_ignores_unknown_keys_and_rejects_empty():
    d = RoutingStats("r1").to_dict() | {"something_new": 1}
    assert RoutingStats.from_dict(d).replica_id == "r1"
    with pytest.raises(ValueError):
        RoutingStats.from_dict({})


def test_from_engine_maps_tags_and_telemetry():
    es = EngineStats(
        kv_free_tokens=64, kv_total_tokens=128, num_running=1, num_waiting=3, step_ms_ar=9.0,
        step_ms_by_block={16: 14.0},
        tau_by_tag={"session": {"a": (2.0, 4)}, "role": {"coder": (5.0, 9)}, "team": {"x": (3.0, 2)}},
        tau_mean=2.5,
    )
    tel = {"gpus": [{"index": 0, "free_bytes": 10}, {"index": 1, "free_bytes": 5}]}
    rs = RoutingStats.from_engine("rep", es, tel, ["a"], max_num_seqs=8)
    assert rs.vram_free_bytes == 15 and rs.num_waiting == 3 and rs.max_num_seqs == 8
    assert rs.tau_by_session == {"a": (2.0, 4)} and rs.tau_by_role["coder"] == (5.0, 9)
    assert rs.step_ms_by_block == {16: 14.0} and rs.cached_sessions == {"a"}  # a set: O(1) lookups
    assert RoutingStats.from_engine("cpu", es, {"gpus": []}).vram_free_bytes is None


def test_a_report_holds_no_objects_the_garbage_collector_keeps_tracking():
    import gc
    import pickle

    d = RoutingStats("r", tau_by_session={f"s{i}": (2.0, 3) for i in range(50)}, cached_sessions=["s1"]).to_dict()
    d = pickle.loads(pickle.dumps(d))  # as Serve hands it to the router
    assert d["tau_by_session"]["s1"] == (2.0, 3) and d["cached_sessions"] == ["s1"]
    gc.collect()
    assert not gc.is_tracked(d["tau_by_session"]["s1"]) and not gc.is_tracked(d["tau_by_session"])
    assert RoutingStats.from_dict(d).tau_by_session == RoutingStats.from_report(d).tau_by_session
