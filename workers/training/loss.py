"""The drafter's loss through the target's (frozen) lm_head, over the full vocabulary, in bounded memory.

``fused_linear_ce`` computes the weighted cross-entropy of ``h @ W.T`` chunk by chunk over rows and, in the
same pass, the gradient with respect to ``h`` (softmax - onehot) @ W; only that [N, H] gradient is kept for
backward, never the [N, V] logits (49,152 columns for SmolLM2: 200 MB per 1,024 rows in fp32). Two GEMMs per
chunk, as autograd would do, with ``compute_dtype`` (bf16 on CPUs with native bf16) for both.

``argmax_rows``: the greedy token per row, chunked the same way (tau estimates).
"""
from __future__ import annotations

import torch


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, row_w, chunk: int, compute_dtype):
        # h [N, H] fp32; weight [V, H] (compute_dtype); target [N] long; row_w [N] (sum 1)
        grad = torch.empty_like(h)
        loss = h.new_zeros(())
        correct = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
        for i in range(0, h.shape[0], chunk):
            t, rw = target[i: i + chunk], row_w[i: i + chunk]
            rows = torch.arange(len(t), device=h.device)
            logits = (h[i: i + chunk].to(compute_dtype) @ weight.T).float()  # [c, V]
            m = logits.amax(dim=-1)  # [c]
            tgt = logits[rows, t]
            correct[i: i + chunk] = tgt >= m
            p = logits.sub_(m[:, None]).exp_()  # unnormalised softmax, in place (few passes over [c, V])
            s = p.sum(dim=-1)
            loss = loss + (rw * (m + s.log() - tgt)).sum()
            p.mul_((rw / s)[:, None])
            p[rows, t] -= rw
            grad[i: i + chunk] = (p.to(compute_dtype) @ weight).float()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, g_loss, _g_correct):
        (grad,) = ctx.saved_tensors
        return grad * g_loss, None, None, None, None, None


def fused_linear_ce(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_w: torch.Tensor,
                    chunk: int = 256, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum_i row_w[i] * CE(h[i] @ weight.T, target[i]) / sum(row_w), argmax == target per row).

    h [N, H] (requires grad), weight [V, H] frozen, target [N] in [0, V), row_w [N] >= 0.
    """
    dt = compute_dtype or weight.dtype
    w = weight if weight.dtype == dt else weight.to(dt)
    return _FusedLinearCE.apply(h.float(), w, target, (row_w / row_w.sum()).float(), chunk, dt)


@torch.no_grad()
def argmax_rows(h: torch.Tensor, weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """h [N, H], weight [V, H] -> argmax_v (h @ weight.T) [N] long, in row chunks."""
    h = h.reshape(-1, h.shape[-1]).to(weight.dtype)
    return torch.cat([(h[i: i + chunk] @ weight.T).argmax(-1) for i in range(0, h.shape[0], chunk)]) \
        if h.shape[0] else torch.empty(0, dtype=torch.long, device=h.device)
