"""Target features for training, recomputed from token ids (the corpus stores no features).

The drafter's context at position j is the concatenation of the raw outputs of target layers
``target_layer_ids`` for token j (HF ``hidden_states[t + 1]``), exactly what the engine captures in
``CausalLM.forward_paged(capture_layers=...)`` while serving. Here one full causal forward per padded batch
computes them; the layers after the deepest tapped one, the final norm and the lm_head are skipped.
"""
from __future__ import annotations

import torch

from workers.models.llama import CausalLM, rope_cos_sin


@torch.no_grad()
def target_features(model: CausalLM, tokens: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
    """tokens [b, T] (right-padded: causal attention keeps padding out of real rows) -> [b, T, n_feat*H]
    in the model's dtype."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    cos, sin = rope_cos_sin(model.rope, positions)
    x = model.embed(tokens)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    want, captured = set(layer_ids), {}
    for i, layer in enumerate(model.model.layers[: max(layer_ids) + 1]):
        x = layer(x, cos, sin)
        if i in want:
            captured[i] = x
    return torch.cat([captured[i] for i in layer_ids], dim=-1)


@torch.no_grad()
def context_features(model: CausalLM, tokens: torch.Tensor, lengths: list[int], layer_ids: list[int]) -> torch.Tensor:
    """tokens [b, C] right-padded, lengths[i] = context positions sequence i needs -> [b, C, n_feat*H], zeros past
    each length. One forward per sequence at its own length: a padded batch forward costs the longest sequence's
    length for every row (1.5x the real tokens on the corpus' length mix, measured on 4-sequence draws)."""
    b, c = tokens.shape
    emb = model.model.embed_tokens.weight
    out = emb.new_zeros(b, c, len(layer_ids) * emb.shape[1])
    for i, n in enumerate(lengths):
        if n > 0:
            out[i, :n] = target_features(model, tokens[i: i + 1, :n], layer_ids)[0]  # [n, F]
    return out
