"""Node profiles and NVML discovery (fake backend; the real one finds no driver here)."""
from __future__ import annotations

import pytest

from cluster.planning.nvml import FakeGpu, FakeNvml, PynvmlBackend, discover, gpu_telemetry, visible_gpu_indices
from cluster.planning.topology import GB, NODES, UnknownNode, get_node, node_from_inventory


def test_profiles():
    b300 = get_node("DGX-B300")
    assert b300.num_gpus == 8 and b300.gpu.memory_bytes == 288 * GB and b300.gpu.hbm_bw == 8e12
    assert b300.link_bw == 900 * GB  # NVLink 5: 1.8 TB/s bidirectional per GPU
    assert NODES["dgx-h100"].gpu.memory_bytes == 80 * GB and NODES["h100"].num_gpus == 1
    assert all(n.gpu.source for n in NODES.values())
    with pytest.raises(UnknownNode, match="known"):
        get_node("dgx-z9")


def test_discover_fake_b300():
    fake = FakeNvml.dgx_b300()
    inv = discover(fake)
    assert len(inv.gpus) == 8 and inv.driver_version == "fake-1.0" and fake.initialised == 0
    assert inv.gpus[3].free_bytes == 288 * 10**9 - (1 << 30) and inv.gpus[3].nvlink_active_links == 18
    node = node_from_inventory(inv)
    assert node.num_gpus == 8 and node.gpu.hbm_bw == 8e12 and "NVLink 5" in node.link_name
    assert node.gpu.memory_bytes == 288 * 10**9


def test_discover_subset_unknown_family_and_pcie():
    fake = FakeNvml([FakeGpu("Some GPU X", 48 << 30, 0, 0), FakeGpu("Some GPU X", 48 << 30, 2 << 30, 0)])
    inv = discover(fake, indices=[1])
    assert [g.index for g in inv.gpus] == [1] and inv.gpus[0].used_bytes == 2 << 30
    node = node_from_inventory(discover(fake))
    assert "unknown GPU family" in node.description and node.link_name.startswith("PCIe")
    with pytest.raises(ValueError, match="out of range"):
        discover(fake, indices=[5])
    tel = gpu_telemetry(fake)
    assert tel[1] == {"index": 1, "name": "Some GPU X", "used_bytes": 2 << 30,
                      "free_bytes": (48 << 30) - (2 << 30), "total_bytes": 48 << 30}


def test_no_driver_is_an_empty_inventory():
    inv = discover(FakeNvml([], fail_init="NVML Shared Library Not Found"))
    assert inv.gpus == [] and "NVML unavailable" in inv.error
    assert node_from_inventory(inv).name == "cpu"
    try:
        real = discover(PynvmlBackend())
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"discover must not raise without a driver: {exc}")
    assert isinstance(real.gpus, list)


def test_visible_gpu_indices():
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert visible_gpu_indices({}) is None
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) is None
