"""DFlash as a Proposer: one drafter forward proposes a whole block for every speculative sequence.

The drafter network (workers/models/dflash.py) is run by the model runner (``propose_logits``,
``write_context``: eager or CUDA graphs) with the target's embedding and lm_head. Here: what it needs from the
engine (its context K/V layers in the KV pool, the target layers it conditions on), how a block is fed
([anchor, MASK x (block-1)] at the sequence's next positions, over its cached context), how drafts are drawn
from its logits (argmax for greedy requests; sampled from the processed distribution q otherwise, q kept for
the verifier; through the grammar for constrained requests, ``ProposeRequest.guide``), and what it records
on commit (the committed tokens' target features -> its context K/V).
"""
from __future__ import annotations

import torch

from workers.engine.runner import ModelRunner, build_draft_inputs
from workers.kernels import cpu as cpu_kernels
from workers.engine.sampling import RowParams, processed_probs, sample
from workers.speculative.proposer import CommitBatch, Draft, ProposeRequest, ProposerContext


class DFlashProposer:
    def __init__(self, drafter, kv_block_size: int, device: torch.device):
        c = drafter.config
        self.network = drafter
        self.max_block = drafter.block_size
        self.kv_layers = [(c.num_key_value_heads, c.head_dim)] * c.num_hidden_layers
        self.capture_layers = list(c.target_layer_ids)
        self.mask_token_id = c.mask_token_id
        self.vocab_size = c.vocab_size
        self.kv_block_size = kv_block_size
        self.device = device
        probe = torch.empty(1, c.num_attention_heads, c.head_dim, dtype=next(drafter.parameters()).dtype)
        self.use_kernel = device.type == "cpu" and cpu_kernels.supports_attention(
            probe, torch.empty(1, 1, c.num_key_value_heads, c.head_dim, dtype=probe.dtype))

    def propose(self, batch: list[ProposeRequest], runner: ModelRunner) -> list[Draft]:
        if not batch:
            return []
        d = build_draft_inputs(
            anchors=[r.token_ids[-1] for r in batch], ctx_lens=[r.num_computed for r in batch],
            blocks=[r.num_drafts + 1 for r in batch], tables=[r.block_table for r in batch],
            mask_token_id=self.mask_token_id, block_size=self.kv_block_size, device=self.device,
            kernel=self.use_kernel and cpu_kernels.available(),  # off once disabled (kernel_check.py)
        )
        logits = runner.propose_logits(d)  # [B, Q-1, V], or [B, Q-1, Vd] over the draft vocabulary
        # [Vd] token id of each draft-vocabulary column, or None (full vocabulary)
        vocab = self.network.draft_vocab if self.network.draft_head is not None else None
        if any(r.guide is not None or not r.sampling.greedy for r in batch):
            logits = logits.float()  # grammar masks and the verifier's q are fp32
            if vocab is not None:
                logits = self._full(logits, vocab)  # ... and live in the full vocabulary
                vocab = None
        guided: dict[int, Draft] = {}
        by_guide: dict[int, list[int]] = {}
        for i, r in enumerate(batch):
            if r.guide is not None:
                by_guide.setdefault(id(r.guide), []).append(i)
        for idx in by_guide.values():  # grammar-constrained requests: drafted through their grammar
            drawn = batch[idx[0]].guide.draw([batch[i] for i in idx], [logits[i, : batch[i].num_drafts] for i in idx])
            guided.update(zip(idx, drawn))
        top = cpu_kernels.argmax(logits)  # [B, Q-1]
        greedy = (top if vocab is None else vocab[top]).tolist()
        out: list[Draft] = []
        for i, r in enumerate(batch):
            n = r.num_drafts
            if i in guided:
                out.append(guided[i])
            elif r.sampling.greedy:
                out.append(Draft(greedy[i][:n], None))
            else:
                q = processed_probs(logits[i, :n], RowParams.build([r.sampling], self.device).repeat(n))  # [n, V]
                out.append(Draft(sample(q, [r.generator]).tolist(), q))
        return out

    def _full(self, logits: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """[B, Q-1, Vd] -> [B, Q-1, V] with -inf outside the draft vocabulary (q is 0 there: still a valid
        proposal distribution, so sampling stays exact)."""
        full = torch.full((*logits.shape[:2], self.vocab_size), float("-inf"), dtype=logits.dtype,
                          device=logits.device)
        return full.index_copy_(2, vocab, logits)

    def commit(self, batch: CommitBatch, runner: ModelRunner) -> None:
        if batch.rows:
            runner.write_context(batch.features, batch.rows, batch.positions, batch.slots)


def build(ctx: ProposerContext) -> DFlashProposer | None:
    """The DFlash proposer of ``EngineConfig.drafter`` (a z-lab checkpoint) or of a passed network; None without."""
    drafter = ctx.network
    if drafter is None and ctx.config.drafter:
        from workers.models.dflash import load_drafter

        drafter = load_drafter(ctx.config.drafter, ctx.target.config, ctx.dtype, ctx.device)
    if drafter is None:
        return None
    if drafter.draft_vocab is not None and drafter.draft_head is None:
        drafter.attach_draft_head(ctx.target.lm_head.weight)
    return DFlashProposer(drafter, ctx.config.kv_block_size, ctx.device)
