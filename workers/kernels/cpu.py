"""Build, load and call the CPU kernels of cpu_kernels.cpp (ctypes; no torch headers, a ~2 s compile once).

The shared library is compiled on first use with the system C++ compiler (``-O3 -march=native -fopenmp``) into
``<specfleet cache>/kernels/<hash>.so``, the hash covering the source, the flags, the compiler and the CPU
model, so a cache shared between machines never runs code built for another CPU. Processes that start at the
same time (Ray workers) build under a file lock; the library is renamed into place whole.

Where no compiler is found or the build fails, ``available()`` is False, the reason is logged once, and the
callers keep their plain-torch path (same results up to fp32 summation order). ``SPECFLEET_CPU_KERNELS=0``
turns the kernels off. ``disable(reason)`` turns them off for the rest of the process (the engine's start-up
self-check, workers/engine/kernel_check.py, does when they disagree with the torch path on its model) and
``suspended()`` for a block of code (that check's torch reference); every caller asks ``available()`` or a
``supports_*`` first, so both send every op back to torch.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
HEAD_DIMS = (64, 128)  # head_dim values the attention kernel is built for

_lib: ctypes.CDLL | None = None
_tried = False
_disabled: str | None = None  # why disable() turned the kernels off in this process
_suspended = 0  # > 0 inside suspended()
_lock = threading.Lock()
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(cxx: str) -> Path:
    from workers.hub import cache_root

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_model()]).encode())
    out_dir = cache_root() / "kernels"
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if so.is_file():
        return so
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.is_file():  # another process built it while we waited
            return so
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cxx} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, so)
    return so


def _declare(lib: ctypes.CDLL) -> None:
    sig = [_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    for name in ("attention_bf16", "attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = sig, ctypes.c_int
    for sfx in ("bf16", "f32"):
        for name, args in (("rmsnorm", [_P, _P, _P, _P, _P, _I, _I, ctypes.c_float, ctypes.c_int]),
                           ("silu_mul", [_P, _P, _I, _I, ctypes.c_int]),
                           ("argmax", [_P, _P, _I, _I, ctypes.c_int]),
                           ("rope_qkv", [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int])):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes, fn.restype = args, None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when unavailable (reason logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SPECFLEET_CPU_KERNELS", "1") == "0":
            return None
        cxx = _compiler()
        if cxx is None:
            log.warning("no C++ compiler found: CPU kernels off, attention runs one torch call per sequence")
            return None
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("CPU kernels unavailable (%s): attention runs one torch call per sequence", exc)
    return _lib


def available() -> bool:
    return _disabled is None and not _suspended and library() is not None


def disable(reason: str) -> None:
    """Turn the kernels off for the rest of this process: every op takes its torch path from the next call on."""
    global _disabled
    _disabled = reason


def disabled_reason() -> str | None:
    """Why ``disable`` turned the kernels off, or None."""
    return _disabled


@contextmanager
def suspended():
    """The torch path for every op while inside (process-wide: other threads' steps too, which stay correct)."""
    global _suspended
    with _lock:
        _suspended += 1
    try:
        yield
    finally:
        with _lock:
            _suspended -= 1


_ATTENTION = {torch.bfloat16: "attention_bf16", torch.float32: "attention_f32"}


def supports_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    nh, kvh = q.shape[1], k_cache.shape[-2]
    return (q.device.type == "cpu" and q.dtype in _ATTENTION and k_cache.dtype == q.dtype
            and nh % kvh == 0 and q.shape[2] in HEAD_DIMS and available())


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
              meta: np.ndarray, tables: torch.Tensor, scale: float, causal: bool) -> None:
    """Short query runs over the paged cache, into ``out``.

    q, out [N, nh, hd] contiguous; k_cache / v_cache [num_blocks, block_size, kvh, hd] contiguous;
    meta [S, 5] int64 contiguous: (row0, n, kv0, slot0, table row) per sequence (cpu_kernels.cpp says what
    each means); tables [*, nblk] int64 contiguous. Only the rows of the listed sequences of ``out`` are written.
    """
    lib = library()
    _, block_size, kvh, hd = k_cache.shape
    fn = getattr(lib, _ATTENTION[q.dtype])
    rc = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), meta.shape[0], meta.ctypes.data,
       tables.data_ptr(), tables.shape[1] if tables.dim() == 2 else 0, block_size, q.shape[1], kvh, hd,
       scale, int(causal), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"attention kernel: head_dim {hd} not built (supports {HEAD_DIMS})")


# ---- small fused ops of a decoder layer (fp32 math, one rounding: equal to torch's up to rounding order) ----
_SFX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def supports_layer_ops(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _SFX and not x.requires_grad and available()


def _threads(rows: int) -> int:
    return torch.get_num_threads() if rows >= 16 else 1


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [R, D] (+ residual [R, D]) -> rmsnorm(x (+ residual)) * weight [R, D], and with a residual also the sum
    (the new residual stream) -> (normed, summed)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    if residual is not None:
        residual = residual.contiguous()
    fn = getattr(library(), "rmsnorm_" + _SFX[x.dtype])
    fn(x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(), out.data_ptr(),
       summed.data_ptr() if summed is not None else None, x.shape[0], x.shape[1], eps, _threads(x.shape[0]))
    return out, summed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [R, 2I] -> silu(gate) * up [R, I]."""
    gate_up = gate_up.contiguous()
    rows, two_i = gate_up.shape
    out = torch.empty(rows, two_i // 2, dtype=gate_up.dtype)
    getattr(library(), "silu_mul_" + _SFX[gate_up.dtype])(gate_up.data_ptr(), out.data_ptr(), rows, two_i // 2,
                                                          _threads(rows))
    return out


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, nh: int) -> torch.Tensor:
    """qkv [R, (nh + 2 kvh) hd] (fused projection), cos / sin [R, hd] fp32, slots [R] -> q [R, nh, hd] rotated;
    k rotated and v written into the cache [nb, bs, kvh, hd] at their slots."""
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"rope_qkv takes fp32 cos / sin, got {cos.dtype} / {sin.dtype}")
    qkv = qkv.contiguous()
    rows = qkv.shape[0]
    _, _, kvh, hd = k_cache.shape
    q = torch.empty(rows, nh, hd, dtype=qkv.dtype)
    getattr(library(), "rope_qkv_" + _SFX[qkv.dtype])(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), rows, nh, kvh, hd, _threads(rows))
    return q


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> [...] long: torch.argmax(x, -1) (first maximum; NaN is the maximum) in one pass. torch's
    CPU argmax over bf16 rows runs element by element at ~1 ms a 49k-token row; this is ~40x faster."""
    if not (x.device.type == "cpu" and x.dtype in _SFX and x.shape[-1] > 0 and available()):
        return x.argmax(-1)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], dtype=torch.long)
    getattr(library(), "argmax_" + _SFX[x.dtype])(flat.data_ptr(), out.data_ptr(), flat.shape[0], flat.shape[1],
                                                  torch.get_num_threads() if flat.shape[0] >= 4 else 1)
    return out.view(x.shape[:-1])
