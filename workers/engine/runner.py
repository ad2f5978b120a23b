"""Model runner: turns one scheduled step into tensors and runs the target and the drafter on them.

``StepInputs`` is everything the target forward needs, as tensors (under tensor parallelism the model's
own entry points broadcast their inputs to the follower ranks: workers/parallel/tp.py ``drive``). Inputs are
built on the host with numpy in one go and moved with a single copy per tensor; the forward itself has no
host syncs. ``DraftInputs`` are the DFlash drafter's (workers/speculative/dflash.py builds them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.models.attention import AttnMetadata, SeqSpan, short_runs
from workers.models.dflash import OwnBlocks


@dataclass
class SeqSlice:
    """One sequence's part of the flat batch."""

    token_ids: list[int]  # query tokens this step
    start_pos: int  # position of token_ids[0] (= tokens already in the cache)
    block_table: list[int]
    logits_rows: list[int]  # offsets within token_ids whose logits are needed


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    attn: AttnMetadata
    logits_index: torch.Tensor  # [R] long rows of the flat batch whose final hidden is returned
    capture: bool  # return the drafter's conditioning features (captured target layer outputs)


def _to(a: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _first_slot(table: list[int], block_size: int) -> int:
    """Slot of position 0 when the table is one run of consecutive blocks (a view of the cache), else -1."""
    t0 = table[0] if table else 0
    return t0 * block_size if all(b == t0 + i for i, b in enumerate(table)) else -1


def build_step_inputs(slices: list[SeqSlice], block_size: int, device, capture: bool,
                      ragged: bool | None = None) -> StepInputs:
    """ragged: per-sequence attention spans (default on CPU) instead of the padded [B, Tq] x [B, K] layout."""
    b = len(slices)
    lens = np.array([len(s.token_ids) for s in slices], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    n, tq = int(lens.sum()), int(lens.max())
    ids = np.fromiter((t for s in slices for t in s.token_ids), dtype=np.int64, count=n)
    pos = np.concatenate([np.arange(s.start_pos, s.start_pos + len(s.token_ids)) for s in slices]).astype(np.int64)
    nblk = max(-(-(s.start_pos + len(s.token_ids)) // block_size) for s in slices)
    tables = np.zeros((b, nblk), dtype=np.int64)
    for i, s in enumerate(slices):
        tables[i, : len(s.block_table)] = s.block_table[:nblk]
    seq_of = np.repeat(np.arange(b), lens)
    slots = tables[seq_of, pos // block_size] * block_size + pos % block_size
    logits_rows = np.array([starts[i] + r for i, s in enumerate(slices) for r in s.logits_rows], dtype=np.int64)
    single = b == 1
    # padded query layout [B, Tq] (the padded attention path and the graph runner's buffers): padding rows repeat
    # the sequence's last row and are dropped on the way out
    t_idx = np.arange(tq)[None, :]
    q_index = starts[:, None] + np.minimum(t_idx, lens[:, None] - 1)  # [B, Tq]
    out_index = seq_of * tq + (np.arange(n) - starts[seq_of])
    if device.type == "cpu" if ragged is None else ragged:  # ragged attention: per-sequence spans, no mask
        seqs = tuple(SeqSpan(int(starts[i]), len(s.token_ids), s.start_pos, _first_slot(s.block_table, block_size), i)
                     for i, s in enumerate(slices))
        mask = np.ones((1, 1, 1), dtype=bool)
    else:
        seqs = None
        mask = np.arange(nblk * block_size)[None, None, :] <= pos[q_index][:, :, None]  # [B, Tq, K]
    attn = AttnMetadata(
        slot_mapping=_to(slots, device),
        block_tables=_to(tables, device),
        q_index=None if single else _to(q_index.reshape(-1), device),
        out_index=None if single else _to(out_index, device),
        mask=_to(mask[:, None], device),
        batch=b,
        q_len=tq,
        seqs=seqs,
        short_runs=short_runs(seqs) if seqs is not None else None,
    )
    return StepInputs(_to(ids, device), _to(pos, device), attn, _to(logits_rows, device), capture)


@dataclass
class DraftInputs:
    block_ids: torch.Tensor  # [B, Q] long: [anchor, MASK x] (MASK also pads shorter blocks)
    positions: torch.Tensor  # [B, Q] long
    block_tables: torch.Tensor  # [B, nblk]
    mask: torch.Tensor  # [B, 1, Q, nblk*bs + Q] bool
    # the CPU kernel's layout (None: the gather + mask path): each block's own K/V are written into the drafter's
    # cache at the block's positions (slots the target's verify of the same step writes too; positions past the
    # committed tokens are rewritten before they are read) and every block row attends to its context + block
    own: OwnBlocks | None = None


def build_draft_inputs(anchors: list[int], ctx_lens: list[int], blocks: list[int], tables: list[list[int]],
                       mask_token_id: int, block_size: int, device, kernel: bool = False) -> DraftInputs:
    """kernel: also the CPU kernel's layout (own_rows / own_slots / runs)."""
    b, q = len(anchors), max(blocks)
    ends = [c + n for c, n in zip(ctx_lens, blocks)] if kernel else ctx_lens  # the kernel also reads the block's own
    nblk = max(1, max(-(-c // block_size) for c in ends))
    ids = np.full((b, q), mask_token_id, dtype=np.int64)
    ids[:, 0] = anchors
    ctx = np.array(ctx_lens, dtype=np.int64)
    pos = ctx[:, None] + np.arange(q)[None, :]
    tab = np.zeros((b, nblk), dtype=np.int64)
    for i, t in enumerate(tables):
        tab[i, : min(len(t), nblk)] = t[:nblk]
    ctx_vis = np.arange(nblk * block_size)[None, :] < ctx[:, None]  # [B, K]
    own_vis = np.arange(q)[None, :] < np.array(blocks)[:, None]  # [B, Q]
    vis = np.concatenate([ctx_vis, own_vis], axis=1)[:, None, None, :]  # [B, 1, 1, K+Q]
    mask = np.broadcast_to(vis, (b, 1, q, vis.shape[-1])).copy()
    d = DraftInputs(_to(ids, device), _to(pos, device), _to(tab, device), _to(mask, device))
    if kernel:
        own = np.concatenate([i * q + np.arange(n) for i, n in enumerate(blocks)]).astype(np.int64)
        seq = own // q
        p = pos.reshape(-1)[own]
        runs = np.array([(i * q, n, c, _first_slot(t, block_size), i) for i, (n, c, t) in
                         enumerate(zip(blocks, ctx_lens, tables))], dtype=np.int64).reshape(-1, 5)
        d.own = OwnBlocks(_to(own, device), _to(tab[seq, p // block_size] * block_size + p % block_size, device), runs)
    return d


class ModelRunner:
    def __init__(self, model, drafter, pool, block_size: int, device):
        self.model = model
        self.drafter = drafter
        self.pool = pool
        self.block_size = block_size
        self.device = device
        self.capture_layers = list(drafter.config.target_layer_ids) if drafter is not None else []

    @torch.inference_mode()
    def run_target(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [R, V] for inp.logits_index rows in the model's dtype, features [N, n_feat*H] or None).
        Argmax needs no fp32 copy (bf16 -> fp32 is exact, so the argmax is the same); whoever needs
        probabilities or masks converts the rows it uses."""
        hidden, feats = self.model.forward_paged(
            inp.input_ids, inp.positions, self.pool.target, inp.attn,
            capture_layers=self.capture_layers if inp.capture else (),
        )
        return self.model.logits(hidden[inp.logits_index]), feats

    @torch.inference_mode()
    def propose_logits(self, d: DraftInputs) -> torch.Tensor:
        """-> drafter logits [B, Q-1, V] in the model's dtype for block positions 1..Q-1 (V = its draft vocabulary
        when it has one)."""
        emb = self.model.embed(d.block_ids)  # [B, Q, H]
        h = self.drafter.propose_hidden(emb, d.positions, self.pool.drafter, d.block_tables, d.mask, d.own)
        return self.draft_logits(h[:, 1:])

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, Q-1, H] -> [B, Q-1, V] through the drafter's draft head (its vocabulary) or the target lm_head.
        One contiguous 2-D [B*(Q-1), H] matmul: the head on a strided 3-D view runs as a bmm over a materialised
        copy of the weight (it was 61% of a speculative step's CPU time)."""
        b, q1, hid = h.shape
        rows = h.reshape(b * q1, hid)
        head = self.drafter.draft_head
        logits = head(rows) if head is not None else self.model.logits(rows)
        return logits.view(b, q1, -1)

    @torch.inference_mode()
    def write_context(self, feats: torch.Tensor, rows: list[int], positions: list[int], slots: list[int]):
        """Committed tokens' features (rows of the flat batch) -> drafter context K/V at their slots."""
        if not rows:
            return
        idx = torch.tensor(rows, device=feats.device)
        self.drafter.write_context(
            feats[idx], torch.tensor(positions, device=self.device), self.pool.drafter,
            torch.tensor(slots, device=self.device),
        )
