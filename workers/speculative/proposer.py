"""The drafting seam: a ``Proposer`` guesses the next tokens of speculative sequences; the target verifies them.

A proposer declares what the engine must provide before the first step (``kv_layers``: cache layers of its
own in the KV pool, sharing the target's block tables; ``capture_layers``: target layers whose outputs the
target forward hands it; ``network``: a network the model runner runs for it, eager or as CUDA graphs) and
does two things per step: ``propose`` a block of drafts for every speculative sequence, and ``commit`` what
it keeps about the tokens the verifier committed. Verification (workers/speculative/verifier.py) is the same for
every proposer, so any proposer is lossless: a bad one only costs speed.

Adding a proposer is one file and one registration: write a class with this surface and a factory
``(ProposerContext) -> Proposer | None`` (None = this engine runs without speculation), then
``register_proposer("name", factory)`` (or a line in ``BUILTIN``); ``EngineConfig(proposer="name")`` picks it.

Grammar-constrained requests carry a ``guide`` (workers/structured/step.py). A proposer that drafts from
logits hands the guided requests' logits rows to ``guide.draw`` (one call for all of them) instead of picking
the tokens itself: the guide masks each position by the grammar state after the previous drafts, so every
draft is grammar-valid. A proposer that ignores the guide still works: its drafts are checked against the
grammar afterwards and the first one the grammar forbids ends the accepted prefix.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from workers.engine.config import EngineConfig
    from workers.engine.params import SamplingParams
    from workers.engine.runner import ModelRunner


@dataclass
class ProposerContext:
    """What the engine offers a proposer factory (before the KV pool and the runner exist)."""

    config: EngineConfig
    target: Any  # the target CausalLM (its config, embedding and lm_head)
    dtype: torch.dtype
    device: torch.device
    network: Any = None  # an already-built proposer network passed to LLMEngine (tests, TP ranks); None = load it


@dataclass
class ProposeRequest:
    """One speculative sequence this step."""

    request_id: str
    token_ids: list[int]  # prompt + output so far; token_ids[-1] is the anchor (pending: not in the KV cache)
    num_computed: int  # positions already in the KV cache (the target's and the proposer's)
    num_drafts: int  # drafts wanted: the block size - 1
    block_table: list[int]  # KV block ids of the sequence (shared by the target and the proposer)
    sampling: SamplingParams
    generator: torch.Generator  # the request's own when it has a seed
    guide: DraftGuide | None = None  # set for grammar-constrained requests


class DraftGuide(Protocol):
    def draw(self, requests: list[ProposeRequest], logits: list[torch.Tensor]) -> list[Draft]:
        """Drafts of guided requests from their drafter logits (logits[i]: [requests[i].num_drafts, V] fp32,
        masked in place), drawn position by position through the grammar (argmax, or sampled from the
        processed masked distribution, which then is ``Draft.probs``)."""
        ...


@dataclass
class Draft:
    tokens: list[int]  # [num_drafts] proposed tokens
    probs: torch.Tensor | None  # [num_drafts, V] the distribution each token was sampled from; None = deterministic


@dataclass
class CommitBatch:
    """Tokens that entered the KV cache this step, in the rows of the flat target batch."""

    features: torch.Tensor | None  # [N, F] captured target layer outputs (None when nothing was captured)
    rows: list[int]  # rows of the flat batch whose tokens are now committed context
    positions: list[int]  # their positions
    slots: list[int]  # their KV cache slots


class Proposer(Protocol):
    max_block: int  # the largest block (anchor + drafts) it proposes
    kv_layers: list[tuple[int, int]]  # (n_kv_heads, head_dim) of each KV cache layer it needs
    capture_layers: list[int]  # target layers whose outputs it reads (captured in the target forward)
    network: Any  # the torch module the model runner runs for it, or None (model-free proposers)

    def propose(self, batch: list[ProposeRequest], runner: ModelRunner) -> list[Draft]:
        """One draft per request, in order."""
        ...

    def commit(self, batch: CommitBatch, runner: ModelRunner) -> None:
        """Record what the proposer keeps about the committed tokens (DFlash: their context K/V)."""
        ...


ProposerFactory = Callable[[ProposerContext], "Proposer | None"]

BUILTIN: dict[str, str] = {"dflash": "workers.speculative.dflash:build"}  # name -> "module:factory", imported on use
_REGISTERED: dict[str, ProposerFactory] = {}


def register_proposer(name: str, factory: ProposerFactory) -> None:
    _REGISTERED[name] = factory


def proposer_factory(name: str) -> ProposerFactory:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        known = ", ".join(sorted(set(BUILTIN) | set(_REGISTERED)))
        raise ValueError(f"unknown proposer {name!r}; known: {known}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_proposer(ctx: ProposerContext) -> Proposer | None:
    """The configured proposer for this engine, or None (autoregressive only)."""
    return proposer_factory(ctx.config.proposer)(ctx)
