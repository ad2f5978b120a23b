"""Where a new drafter's weights come from: random, copied from target layers, or a trained drafter (warm start).

* random: every matrix N(0, 0.02), norms 1; the final norm is a copy of the target's (its output feeds the
  target's lm_head);
* ``from_target_layers``: drafter layer i <- target decoder layer ids[i] (attention, MLP, both norms; the
  Qwen3-style q/k norms the Llama target lacks stay 1); fc random;
* ``warm_start``: the weights of a z-lab drafter directory whose shapes and DFlash settings match exactly
  (anything else is refused, naming the mismatch).
"""
from __future__ import annotations

from pathlib import Path

import torch

from workers.models.dflash import DFlashDrafter, DrafterConfig, load_drafter
from workers.models.config import ModelConfig


def random_drafter(cfg: DrafterConfig, target, seed: int = 0) -> DFlashDrafter:
    torch.manual_seed(seed)
    d = DFlashDrafter(cfg)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        d.norm.weight.copy_(target.model.norm.weight.float())
    return d


def parse_init_layers(text: str, num_drafter_layers: int, num_target_layers: int) -> list[int]:
    """'last' -> the target's last n layers; '3,10,20' -> those; checked against both models."""
    if text == "last":
        ids = list(range(num_target_layers - num_drafter_layers, num_target_layers))
    else:
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--init-from-target expects 'last' or comma-separated layer ids, got {text!r}") from None
    if len(ids) != num_drafter_layers:
        raise ValueError(f"--init-from-target names {len(ids)} target layers for a {num_drafter_layers}-layer drafter")
    bad = [i for i in ids if not 0 <= i < num_target_layers]
    if bad:
        raise ValueError(f"--init-from-target layers {bad} are not layers of the {num_target_layers}-layer target")
    return ids


def from_target_layers(drafter: DFlashDrafter, target, ids: list[int]) -> None:
    """Copy target decoder layers ids[i] into drafter layer i (same hidden / head shapes required)."""
    for i, t in enumerate(ids):
        src = target.model.layers[t].state_dict()
        dst = drafter.layers[i].state_dict()
        for k, v in dst.items():
            if k in src:
                if src[k].shape != v.shape:
                    raise ValueError(f"target layer {t} weight {k} has shape {tuple(src[k].shape)}, the drafter's "
                                     f"is {tuple(v.shape)}")
                dst[k] = src[k].float().clone()
        drafter.layers[i].load_state_dict(dst)


def warm_start(drafter: DFlashDrafter, path: str | Path, target_cfg: ModelConfig) -> None:
    """Load the weights of the drafter at ``path``; refuse it unless its config equals this one's."""
    src = load_drafter(path, target_cfg)  # validates against the target (hidden, layers, vocabulary)
    a, b = src.config, drafter.config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "block_size", "mask_token_id", "target_layer_ids"):
        if getattr(a, key) != getattr(b, key):
            raise ValueError(f"cannot warm-start from {path}: its {key} is {getattr(a, key)!r}, this run's is "
                             f"{getattr(b, key)!r}")
    drafter.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
