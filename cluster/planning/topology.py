"""Node profiles as data: what a planner needs to know about a machine.

Pure and torch-free. Figures are vendor datasheet values (sources in docs/placement.md), per GPU,
dense (no sparsity). Units: bytes, bytes/s, FLOP/s, seconds. Vendor "GB" / "TB/s" are decimal.

`node_from_inventory` turns what NVML discovered on a real machine (cluster/planning/nvml.py) into a
profile: memory comes from NVML, bandwidth and FLOP/s from the matching GPU profile below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cluster.planning.nvml import NodeInventory

GB = 1e9
TB = 1e12
GiB = 1 << 30


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_bytes: float  # HBM capacity (vendor figure, decimal GB)
    hbm_bw: float  # bytes/s, peak
    bf16_flops: float  # dense tensor-core FLOP/s (the activation dtype we plan with)
    fp8_flops: float = 0.0  # dense, for reference
    fp4_flops: float = 0.0  # dense, for reference (0 = not supported in hardware)
    source: str = ""


@dataclass(frozen=True)
class NodeProfile:
    name: str
    description: str
    gpu: GpuProfile
    num_gpus: int
    link_name: str
    link_bw: float  # bytes/s per GPU, ONE direction (NVLink figures are quoted bidirectional)
    allreduce_latency_s: float  # fixed cost of one small collective (alpha term)
    step_overhead_s: float = 150e-6  # host scheduling + sampling + graph launch per engine step
    source: str = ""
    # between nodes (multi-node clusters): the node's scale-out NICs, bytes/s per GPU, one direction.
    # Only used to explain why a TP group never spans nodes; "" / 0 = no scale-out network stated.
    scaleout_name: str = ""
    scaleout_bw: float = 0.0
    gpu_names: tuple[str, ...] = field(default_factory=tuple)  # real names when discovered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- GPU profiles (per GPU, dense) -----------------------------------------------------------
B300 = GpuProfile(
    "NVIDIA B300 SXM (Blackwell Ultra)", 288 * GB, 8 * TB,
    bf16_flops=2.25e15, fp8_flops=4.5e15, fp4_flops=13.5e15,
    source="NVIDIA DGX B300 / HGX B300 datasheets: 2.3 TB HBM3e per 8 GPUs, 8 TB/s per GPU, "
    "FP4 108 PF dense, FP8 72 PF and BF16 36 PF with sparsity per 8 GPUs",
)
B200 = GpuProfile(
    "NVIDIA B200 SXM", 180 * GB, 8 * TB,
    bf16_flops=2.25e15, fp8_flops=4.5e15, fp4_flops=9e15,
    source="NVIDIA DGX B200 datasheet: 1,440 GB HBM3e and 64 TB/s per 8 GPUs; "
    "HGX B200: FP4 72 PF dense, FP8 72 PF / BF16 36 PF with sparsity per 8 GPUs",
)
H200 = GpuProfile(
    "NVIDIA H200 SXM", 141 * GB, 4.8 * TB,
    bf16_flops=989e12, fp8_flops=1979e12,
    source="NVIDIA H200 product page: 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TF / FP8 3,958 TF with sparsity",
)
H100 = GpuProfile(
    "NVIDIA H100 SXM", 80 * GB, 3.35 * TB,
    bf16_flops=989e12, fp8_flops=1979e12,
    source="NVIDIA H100 datasheet (SXM): 80 GB HBM3, 3.35 TB/s, BF16 1,979 TF / FP8 3,958 TF with sparsity",
)
CPU_SANDBOX = GpuProfile(
    "CPU (2-core sandbox, fp32)", 24 * GiB, 35 * GB,
    bf16_flops=180e9,
    source="measured 2026-11-23 on the 2-core CPU sandbox: numpy copy 35 GB/s, torch fp32 matmul "
    "2048^3 ~180 GFLOP/s, 24 GiB RAM (see docs/placement.md)",
)

NVLINK5 = ("NVLink 5 / NVSwitch", 900 * GB)  # 1.8 TB/s bidirectional per GPU
NVLINK4 = ("NVLink 4 / NVSwitch", 450 * GB)  # 900 GB/s bidirectional per GPU
PCIE5 = ("PCIe Gen5 x16", 64 * GB)  # ~128 GB/s bidirectional
# scale-out NICs, one per GPU (DGX datasheets: 8 x single-port ConnectX per node); Gb/s / 8 = GB/s
CX8 = dict(scaleout_name="ConnectX-8 800 Gb/s InfiniBand / Ethernet, one NIC per GPU", scaleout_bw=100 * GB)
CX7 = dict(scaleout_name="ConnectX-7 400 Gb/s InfiniBand / Ethernet, one NIC per GPU", scaleout_bw=50 * GB)

NODES: dict[str, NodeProfile] = {
    "dgx-b300": NodeProfile(
        "dgx-b300", "NVIDIA DGX B300: 8 x B300 288 GB HBM3e, NVLink 5 (1.8 TB/s per GPU, 14.4 TB/s total)",
        B300, 8, *NVLINK5, allreduce_latency_s=6e-6, source=B300.source, **CX8),
    "dgx-b200": NodeProfile(
        "dgx-b200", "NVIDIA DGX B200: 8 x B200 180 GB HBM3e, NVLink 5 (1.8 TB/s per GPU)",
        B200, 8, *NVLINK5, allreduce_latency_s=6e-6, source=B200.source, **CX7),
    "dgx-h200": NodeProfile(
        "dgx-h200", "NVIDIA DGX H200: 8 x H200 141 GB HBM3e, NVLink 4 (900 GB/s per GPU)",
        H200, 8, *NVLINK4, allreduce_latency_s=8e-6, source=H200.source, **CX7),
    "dgx-h100": NodeProfile(
        "dgx-h100", "NVIDIA DGX H100: 8 x H100 80 GB HBM3, NVLink 4 (900 GB/s per GPU)",
        H100, 8, *NVLINK4, allreduce_latency_s=8e-6, source=H100.source, **CX7),
    "h100": NodeProfile(
        "h100", "a single NVIDIA H100 SXM 80 GB (no peers)",
        H100, 1, *PCIE5, allreduce_latency_s=0.0, source=H100.source),
    "cpu": NodeProfile(
        "cpu", "the 2-core CPU sandbox (one 'device' = host RAM, fp32)",
        CPU_SANDBOX, 1, "none", 0.0, allreduce_latency_s=0.0, step_overhead_s=1e-3,
        source=CPU_SANDBOX.source),
}

# GPU name fragments (as NVML reports them) -> profile with bandwidth / FLOP/s figures
_BY_NAME = (("B300", B300, NVLINK5), ("B200", B200, NVLINK5), ("H200", H200, NVLINK4),
            ("H100", H100, NVLINK4))


class UnknownNode(ValueError):
    pass


def get_node(name: str) -> NodeProfile:
    try:
        return NODES[name.lower()]
    except KeyError:
        raise UnknownNode(f"unknown node {name!r}; known: {', '.join(NODES)} (or 'auto' to discover via NVML)") from None


def node_from_inventory(inv: "NodeInventory") -> NodeProfile:
    """A profile for a discovered node: NVML's memory, the table's bandwidth for the GPU family.

    Unknown GPU families get H100 bandwidth figures (stated in the description) - a conservative guess.
    No GPUs -> the CPU profile.
    """
    if not inv.gpus:
        return NODES["cpu"]
    first = inv.gpus[0]
    base, link = H100, NVLINK4
    known = False
    for frag, prof, lk in _BY_NAME:
        if frag in first.name.upper():
            base, link, known = prof, lk, True
            break
    has_nvlink = all(g.nvlink_active_links > 0 for g in inv.gpus) and len(inv.gpus) > 1
    link_name, link_bw = link if has_nvlink else PCIE5
    mem = min(g.total_bytes for g in inv.gpus)
    gpu = replace(base, name=first.name, memory_bytes=float(mem))
    desc = f"discovered: {len(inv.gpus)} x {first.name}, {mem / GiB:.1f} GiB each, {link_name}"
    if not known:
        desc += " (unknown GPU family: H100 bandwidth figures assumed)"
    return NodeProfile(
        "auto", desc, gpu, len(inv.gpus), link_name, link_bw,
        allreduce_latency_s=8e-6 if has_nvlink else 20e-6, source=base.source,
        gpu_names=tuple(g.name for g in inv.gpus),
    )
