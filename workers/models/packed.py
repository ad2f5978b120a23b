"""CPU fast path: every linear weight reordered once into oneDNN's blocked layout, q/k/v and gate/up fused.

On CPUs with native bf16 (AMX-BF16 / AVX512-BF16) a plain ``F.linear`` on a bf16 weight re-lays the weight out
on every call; a weight reordered once at load time (``torch.ops.mkldnn._reorder_linear_weight``, what
torch.compile's CPU backend does under ``freezing``) runs the same GEMM 1.5–3.7x faster at the batch sizes of a
decode step (docs/benchmarks.md, "CPU fast path"). ``pack_for_cpu`` changes kernels only: every parameter keeps
its name, shape and values (state dicts, TP sharding and the oracle see the same model), and the result of each
GEMM is the same product in bf16 up to summation order.

  * each ``nn.Linear`` of the decoder / drafter becomes a ``PackedLinear`` that keeps the original ``weight``
    (and bias) parameters and adds the reordered copy as a non-persistent buffer;
  * ``Attention.fused_qkv`` / ``DraftAttention.fused_kv`` / ``MLP.fused_gate_up``: one GEMM over the
    concatenated weights instead of three / two / two;
  * the lm_head gets its own packed copy (the tied embedding keeps the plain table for lookups).

Memory: the reordered copies double the weights' footprint (+270 MB for SmolLM2-135M in bf16).
"""
from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 1  # oneDNN picks its blocking for this M; measured best for decode (M = 1..16) on AMX


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU with native bf16, and a torch build with the oneDNN ops."""
    from workers.models.loader import cpu_has_native_bf16

    ops = torch.ops.mkldnn
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and cpu_has_native_bf16())


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


class PackedGEMM(nn.Module):
    """y = x @ W.T (+ b) with W reordered once; x [..., I] -> [..., O]. Holds only the packed copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", _reorder(weight), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedLinear(nn.Linear):
    """Drop-in for an ``nn.Linear``: same parameters (``weight``, ``bias``), forward through the packed copy."""

    def __init__(self, lin: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias
        self.gemm = PackedGEMM(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x)


def _fused(*linears: nn.Linear) -> PackedGEMM:
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    biases = [lin.bias for lin in linears]
    b = None if all(x is None for x in biases) else torch.cat(
        [x.detach() if x is not None else torch.zeros(lin.out_features, dtype=w.dtype, device=w.device)
         for x, lin in zip(biases, linears)])
    return PackedGEMM(w, b)


_COVERED = {"Attention": {"q_proj", "k_proj", "v_proj"}, "DraftAttention": {"k_proj", "v_proj"},
            "MLP": {"gate_proj", "up_proj"}}  # run by the fused GEMM: no packed copy of their own


def _pack_children(module: nn.Module) -> None:
    covered = _COVERED.get(type(module).__name__, set())
    for name, child in module.named_children():
        if name in covered:
            continue
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child))
        else:
            _pack_children(child)


@torch.no_grad()
def pack_for_cpu(module: nn.Module) -> nn.Module:
    """Pack a CausalLM or a DFlashDrafter in place (idempotent). Call after tensor-parallel sharding."""
    from workers.models.dflash import DraftAttention
    from workers.models.llama import MLP, Attention, CausalLM

    for m in module.modules():
        if isinstance(m, Attention) and m.fused_qkv is None:
            m.fused_qkv = _fused(m.q_proj, m.k_proj, m.v_proj)
        elif isinstance(m, DraftAttention) and m.fused_kv is None:
            m.fused_kv = _fused(m.k_proj, m.v_proj)
        elif isinstance(m, MLP) and m.fused_gate_up is None:
            m.fused_gate_up = _fused(m.gate_proj, m.up_proj)
    if isinstance(module, CausalLM) and type(module.lm_head) is nn.Linear:
        module.lm_head = PackedLinear(module.lm_head)  # keeps the (tied) weight parameter
    _pack_children(module)
    return module


def is_packed(module: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, PackedGEMM)) for m in module.modules())
