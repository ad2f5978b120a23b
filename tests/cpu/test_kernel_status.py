"""The engine's start-up CPU-kernel self-check as an operator sees it (orchestrator/kernel_status.py): per replica in
/health (``cpu_kernels``) and /metrics (``specfleet_cpu_kernel_check``, ``specfleet_cpu_kernels_enabled``,
``specfleet_cpu_kernel_check_rel_err``), and a warning in the server log when the check turned the kernels off.
Real tiny engines (one with a deliberately broken kernel) behind in-process replicas, next to a mock engine, which
has no check: it shows as not run, not as a pass."""
from __future__ import annotations

import logging
from types import SimpleNamespace as NS

import pytest

from orchestrator.api.server import create_app
from orchestrator.api.state import LocalBackend, ServerState
from orchestrator.fleet import RouterDirectory, RouterRegistry
from orchestrator.kernel_status import REPORT_KEY, CpuKernelStatus
from orchestrator.mock_engine import MockEngine
from orchestrator.replica import ReplicaCore
from tests.helpers.serving import asgi_client, mock_config
from workers.kernels import cpu as cpu_kernels


def test_status_from_the_engines_check():
    """From what the engine reports (KernelCheck.to_dict(), the real format)."""
    import math

    from workers.engine.kernel_check import KernelCheck, PartCheck

    def part(name, rel_err, error=None):
        return PartCheck(name, 17, 1.0, 1.0, rel_err, 0.2, 0.75, error)

    assert CpuKernelStatus.from_engine(None) == CpuKernelStatus("not_run", None)  # not a pass: enabled unknown
    ok = KernelCheck(ok=True, dtype="bfloat16", parts=[part("target", 0.01), part("drafter", 0.07)]).to_dict()
    assert CpuKernelStatus.from_engine(ok) == CpuKernelStatus("passed", True, 0.07)
    bad = KernelCheck(ok=False, dtype="bfloat16", parts=[part("target", math.inf, "E: x"), part("drafter", 0.07)],
                      kernels_on=False).to_dict()
    assert CpuKernelStatus.from_engine(bad) == CpuKernelStatus("failed", False, None,  # a part not finite: None
                                                               "target: the kernel path raised E: x")
    assert CpuKernelStatus.from_engine(bad).turned_off
    skip = KernelCheck(ok=None, skipped="device cuda: no CPU kernels", kernels_on=False).to_dict()
    assert CpuKernelStatus.from_engine(skip) == CpuKernelStatus("skipped", False, None, "device cuda: no CPU kernels")
    assert not CpuKernelStatus.from_engine(skip).turned_off


def test_status_from_a_report():
    st = CpuKernelStatus("failed", False, 1.5, "target: greedy token agrees on 24% of 17 rows")
    assert CpuKernelStatus.from_report({REPORT_KEY: st.to_dict()}) == st
    assert CpuKernelStatus.from_report({}) is None and CpuKernelStatus.from_report(None) is None  # not reported
    for bad in ({"check": "fine"}, {"check": "passed", "enabled": "yes"}, {"check": "passed", "rel_err": "0.1"},
                {"check": "passed", "rel_err": float("nan")}, ["passed"]):
        assert CpuKernelStatus.from_report({REPORT_KEY: bad}) is None, bad


def test_the_router_directory_reads_it_once_per_report():
    report = {"replica_id": "r0", "kv_free_tokens": 3,
              REPORT_KEY: CpuKernelStatus("passed", True, 0.02).to_dict()}
    reps = {0: NS(replica_id=NS(unique_id="r0"), node_id="n0", max_ongoing_requests=4, routing_stats=report)}
    reg = RouterRegistry()
    reg.attach(NS(_deployment_id=NS(app_name="app", name="ModelReplica"), curr_replicas=reps))
    d = RouterDirectory("app", "ModelReplica", reg)
    first = d.replicas()[0].cpu_kernels
    assert first == CpuKernelStatus("passed", True, 0.02) and d.replicas()[0].cpu_kernels is first
    reps[0].routing_stats = {"replica_id": "r0"}  # an older replica: no check reported
    assert d.replicas()[0].cpu_kernels is None


@pytest.fixture
def _restore_kernel_state(monkeypatch):
    """The broken engine's failed check turns the kernels off for the process: undone after the test."""
    monkeypatch.setattr(cpu_kernels, "_disabled", None)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: CPU kernels unavailable")
async def test_health_and_metrics_show_each_replicas_kernel_check(tmp_path, monkeypatch, caplog,
                                                                  _restore_kernel_state):
    from orchestrator.config import ReplicaSpec
    from tests.cpu.test_kernel_check import HD64, _engine, _norm_without_weight
    from tests.helpers.tiny import make_tiny_hf_dir

    tiny = make_tiny_hf_dir(tmp_path / "tiny", "llama", **HD64)
    healthy, _ = _engine(tiny, drafter_block=None)  # first: the broken one turns the kernels off process-wide
    monkeypatch.setattr(cpu_kernels, "rmsnorm", _norm_without_weight(cpu_kernels.rmsnorm))
    broken, _ = _engine(tiny, drafter_block=None)
    assert healthy.kernel_check["ok"] and broken.kernel_check["ok"] is False

    cfg = mock_config(tmp_path)
    spec = ReplicaSpec()
    cores = [ReplicaCore(e, spec, replica_id=rid, rank=i, block_size=16, spec_available=False)
             for i, (rid, e) in enumerate([("bad", broken), ("good", healthy), ("mock", MockEngine())])]
    state = ServerState.create(cfg, LocalBackend(cores, ["n0", "n0", "n1"]))
    with caplog.at_level(logging.WARNING, logger="specfleet.replica"):
        async with asgi_client(create_app(state)) as c:
            h = (await c.get("/health")).json()
            m = (await c.get("/metrics")).text
            assert (await c.get("/health")).json() == h
    assert h["status"] == "ok"  # the torch path serves: off kernels are slower, not unhealthy
    k = h["cpu_kernels"]
    assert sorted(k) == ["bad", "good", "mock"]
    assert (k["bad"]["check"], k["bad"]["enabled"]) == ("failed", False)
    assert k["bad"]["reason"].startswith("target: greedy token agrees on") and k["bad"]["rel_err"] > 0.2
    assert (k["good"]["check"], k["good"]["enabled"], k["good"]["reason"]) == ("passed", True, None)
    assert 0 <= k["good"]["rel_err"] < 1e-3  # fp32 tolerance
    assert k["mock"] == {"check": "not_run", "enabled": None, "rel_err": None, "reason": None}

    assert 'specfleet_cpu_kernels_enabled{check="failed",replica="bad"} 0.0' in m
    assert 'specfleet_cpu_kernels_enabled{check="passed",replica="good"} 1.0' in m
    assert 'specfleet_cpu_kernel_check{check="not_run",replica="mock"} 1.0' in m
    assert 'specfleet_cpu_kernel_check{check="failed",replica="bad"} 1.0' in m
    assert not [ln for ln in m.splitlines()  # not run: whether kernels serve is not known, so no sample
                if ln.startswith("specfleet_cpu_kernels_enabled{") and 'replica="mock"' in ln]
    assert f'specfleet_cpu_kernel_check_rel_err{{replica="bad"}} {k["bad"]["rel_err"]}' in m

    warned = [r.getMessage() for r in caplog.records if "CPU kernels OFF" in r.getMessage()]
    assert len(warned) == 1 and "replica bad" in warned[0] and "target:" in warned[0], warned  # once, not per scrape
