"""SQLite session registry: ownership, turns, teams, durability across re-open."""
from __future__ import annotations

from orchestrator.sessions import SessionRegistry


def test_lifecycle_ownership_and_reopen(tmp_path):
    path = str(tmp_path / "s.sqlite")
    reg = SessionRegistry(path)
    s = reg.create("owner-a", "coder", "t1", {"agent": "x"})
    assert s["id"].startswith("sess_") and s["turns"] == 0 and s["spec"] is None
    assert reg.get("owner-b", s["id"]) is None and not reg.delete("owner-b", s["id"])
    reg.record_turn(s["id"], replica="r1", route="acceptance", spec={"enabled": True, "block_size": 8},
                    prompt_tokens=10, completion_tokens=30, target_passes=10, finish_reason="length")
    reg.record_turn(s["id"], replica="r2", route="explore", spec={"enabled": False, "block_size": 8},
                    prompt_tokens=5, completion_tokens=4, target_passes=4, finish_reason="stop")
    reg.close()

    reg = SessionRegistry(path)  # a restart
    got = reg.get("owner-a", s["id"])
    assert got["turns"] == 2 and got["completion_tokens"] == 34 and got["metadata"] == {"agent": "x"}
    assert got["spec"] == {"enabled": False, "block_size": 8} and got["last_replica"] == "r2"
    assert [t["replica"] for t in got["replica_history"]] == ["r1", "r2"]
    assert got["acceptance_by_replica"]["r1"]["tau"] == 3.0
    assert got["tau_ewma"] == 3.0  # AR turns do not move the acceptance EWMA
    other = reg.create("owner-a", "critic", "t1", {})
    reg.create("owner-b", "coder", "t1", {})
    team = reg.team("owner-a", "t1")
    assert team["sessions"] == 2 and set(team["by_role"]) == {"coder", "critic"}
    assert [x["id"] for x in reg.list("owner-a", team="t1")] == [s["id"], other["id"]]
    assert reg.team("owner-a", "nope") is None
    assert reg.delete("owner-a", s["id"]) and reg.get("owner-a", s["id"]) is None
