"""Discovery of the real node through NVML (`pynvml` from nvidia-ml-py), with a fake backend for tests.

`discover()` returns a `NodeInventory` (GPU index, name, total / free / used memory, active NVLink
links). Without a driver (CPU machines) it returns an empty inventory rather than raising.
Torch-free: the planner and the replica's telemetry use it without importing torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    nvlink_active_links: int = 0
    uuid: str = ""


@dataclass
class NodeInventory:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str = ""
    error: str | None = None  # why discovery found nothing (no driver, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NvmlBackend(Protocol):
    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int, int]: ...  # total, free, used (bytes)
    def nvlink_active_links(self, index: int) -> int: ...


class PynvmlBackend:
    """The real thing (nvidia-ml-py)."""

    def __init__(self) -> None:
        import pynvml

        self._nv = pynvml

    def init(self) -> None:
        self._nv.nvmlInit()

    def shutdown(self) -> None:
        self._nv.nvmlShutdown()

    def _h(self, index: int):
        return self._nv.nvmlDeviceGetHandleByIndex(index)

    def driver_version(self) -> str:
        v = self._nv.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)

    def device_count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    def name(self, index: int) -> str:
        n = self._nv.nvmlDeviceGetName(self._h(index))
        return n.decode() if isinstance(n, bytes) else str(n)

    def uuid(self, index: int) -> str:
        u = self._nv.nvmlDeviceGetUUID(self._h(index))
        return u.decode() if isinstance(u, bytes) else str(u)

    def memory(self, index: int) -> tuple[int, int, int]:
        m = self._nv.nvmlDeviceGetMemoryInfo(self._h(index))
        return int(m.total), int(m.free), int(m.used)

    def nvlink_active_links(self, index: int) -> int:
        h, n = self._h(index), 0
        for link in range(getattr(self._nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if self._nv.nvmlDeviceGetNvLinkState(h, link) == self._nv.NVML_FEATURE_ENABLED:
                    n += 1
            except self._nv.NVMLError:  # link not present / not supported (PCIe boards)
                break
        return n


@dataclass
class FakeGpu:
    name: str
    total_bytes: int
    used_bytes: int = 0
    nvlink_active_links: int = 0


class FakeNvml:
    """In-memory NVML for tests; `used_bytes` can be changed to simulate load."""

    def __init__(self, gpus: list[FakeGpu], driver: str = "fake-1.0", fail_init: str | None = None):
        self.gpus = gpus
        self.driver = driver
        self.fail_init = fail_init
        self.initialised = 0

    @classmethod
    def dgx_b300(cls) -> "FakeNvml":
        return cls([FakeGpu("NVIDIA B300 SXM6 AC", 288 * 10**9, 1 << 30, 18) for _ in range(8)])

    def init(self) -> None:
        if self.fail_init:
            raise RuntimeError(self.fail_init)
        self.initialised += 1

    def shutdown(self) -> None:
        self.initialised -= 1

    def driver_version(self) -> str:
        return self.driver

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, index: int) -> str:
        return self.gpus[index].name

    def uuid(self, index: int) -> str:
        return f"GPU-fake-{index}"

    def memory(self, index: int) -> tuple[int, int, int]:
        g = self.gpus[index]
        return g.total_bytes, g.total_bytes - g.used_bytes, g.used_bytes

    def nvlink_active_links(self, index: int) -> int:
        return self.gpus[index].nvlink_active_links


def _default_backend() -> NvmlBackend:
    return PynvmlBackend()


def discover(backend: NvmlBackend | None = None, indices: list[int] | None = None) -> NodeInventory:
    """Inventory of the node's GPUs (all of them, or only `indices` = physical NVML indices)."""
    try:
        nv = backend or _default_backend()
        nv.init()
    except Exception as exc:  # no driver / no library: a CPU machine
        return NodeInventory(error=f"NVML unavailable: {exc}")
    try:
        count = nv.device_count()
        gpus = []
        for i in indices if indices is not None else range(count):
            if not 0 <= i < count:
                raise ValueError(f"GPU index {i} out of range (node has {count})")
            total, free, used = nv.memory(i)
            gpus.append(GpuInfo(i, nv.name(i), total, free, used, nv.nvlink_active_links(i), nv.uuid(i)))
        return NodeInventory(gpus=gpus, driver_version=nv.driver_version())
    finally:
        nv.shutdown()


def visible_gpu_indices(env: dict[str, str] | None = None) -> list[int] | None:
    """Physical indices from CUDA_VISIBLE_DEVICES (integers only); None = no restriction."""
    import os

    val = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if val is None or val.strip() == "":
        return None
    try:
        return [int(x) for x in val.split(",") if x.strip()]
    except ValueError:  # UUIDs / MIG names: let NVML list everything
        return None


def gpu_telemetry(backend: NvmlBackend | None = None, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """The replica's `telemetry()["gpus"]` list; empty on CPU."""
    inv = discover(backend, indices)
    return [
        {"index": g.index, "name": g.name, "used_bytes": g.used_bytes, "free_bytes": g.free_bytes,
         "total_bytes": g.total_bytes}
        for g in inv.gpus
    ]
