"""Step-cost models for the simulator: seconds per engine step as a function of batch and block.

* ``LinearStepModel``: fitted on this machine from measured engine steps (benchmarks/calibrate.py):
  t_ar(b) = a0 + a1*b ;  t_spec(b, B) = s0 + s1*b*B (draft + verify) ;  prefill = p1 * tokens.
* ``RooflineStepModel``: cluster.planning.roofline (HBM bandwidth / FLOP/s / NVLink all-reduce) for a model,
  a drafter and a TP degree on a node profile, e.g. the DGX B300.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class LinearStepModel:
    a0: float  # s, AR step at batch 0 (fixed cost: weights read, launch)
    a1: float  # s per sequence in an AR step
    s0: float  # s, speculative step fixed cost (drafter + verify)
    s1: float  # s per token verified (batch x block)
    p1: float  # s per prompt token of prefill
    source: str = ""

    def ar_s(self, batch: int, ctx: int = 0) -> float:
        return self.a0 + self.a1 * batch

    def spec_s(self, batch: int, block: int, ctx: int = 0) -> float:
        return self.s0 + self.s1 * batch * block

    def prefill_s(self, tokens: int) -> float:
        return self.p1 * tokens

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LinearStepModel:
        return cls(**json.loads(Path(path).read_text()))

    def scaled(self, factor: float) -> LinearStepModel:
        """The same shape, `factor` times slower (e.g. cores shared by co-located replicas)."""
        return LinearStepModel(self.a0 * factor, self.a1 * factor, self.s0 * factor, self.s1 * factor,
                               self.p1 * factor, self.source + f" x{factor:g}")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = c0 + c1 x (c0, c1 >= 0)."""
    n = len(xs)
    if n == 1:
        return ys[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    vx = sum((x - mx) ** 2 for x in xs)
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / vx if vx else 0.0
    c1 = max(0.0, c1)
    return max(0.0, my - c1 * mx), c1


class RooflineStepModel:
    """Roofline step times of one replica (model, TP degree, drafter) on a node profile."""

    def __init__(self, model: str, node: str = "dgx-b300", tp: int = 1, drafter: bool = True,
                 block: int = 16, prefill_chunk: int = 512):
        from cluster.planning.presets import default_drafter, resolve_model
        from cluster.planning.topology import get_node

        self.model = resolve_model(model)
        self.node = get_node(node)
        self.tp = tp
        self.drafter = default_drafter(self.model, block) if drafter else None
        self.chunk = prefill_chunk
        self.source = f"cluster.planning.roofline: {self.model.name} TP{tp} on {self.node.name}"

    def ar_s(self, batch: int, ctx: int = 1024) -> float:
        from cluster.planning.roofline import target_step

        return target_step(self.model, self.node, self.tp, max(1, batch), 1, max(1, ctx)).total_s

    def spec_s(self, batch: int, block: int, ctx: int = 1024) -> float:
        from cluster.planning.roofline import drafter_step, target_step

        t = target_step(self.model, self.node, self.tp, max(1, batch), block, max(1, ctx)).total_s
        if self.drafter is not None:
            t += drafter_step(self.drafter, self.model, self.node, self.tp, max(1, batch), block, max(1, ctx)).total_s
        return t

    def prefill_s(self, tokens: int) -> float:
        from cluster.planning.roofline import target_step

        if tokens <= 0:
            return 0.0
        chunks = max(1, round(tokens / self.chunk))
        return chunks * target_step(self.model, self.node, self.tp, 1, min(tokens, self.chunk), self.chunk).total_s
