"""Step-cost models for the simulator: seconds per engine step as a function of batch and block.

* ``TableStepModel``: the engine's own measured step-cost table (workers/engine/calibrate.py, what a serving
  replica measures at start-up and reports to the router), taken by benchmarks/calibrate.py at one or more
  context lengths, plus a measured prefill line; read piecewise linearly (``interp``).
* ``LinearStepModel``: an older two-parameter fit (kept for the results it produced):
  t_ar(b) = a0 + a1*b ;  t_spec(b, B) = s0 + s1*b*B (draft + verify) ;  prefill = p1 * tokens.
* ``RooflineStepModel``: cluster.planning.roofline (HBM bandwidth / FLOP/s / NVLink all-reduce) for a model,
  a drafter and a TP degree on a node profile, e.g. the DGX B300.

Each also prices a whole decode step as the engine runs it (workers/engine/step.py: one target forward over the
flat batch of every sequence's rows, 1 per AR sequence, the block per speculative one; one drafter pass for the
speculative ones): ``decode_s(blocks, ctx)``, ``blocks`` = each sequence's block this step (1 = AR). A pure step
(every sequence at one block) costs exactly ``ar_s`` / ``spec_s``; a step that mixes blocks costs its rows:

* Linear: pure costs are already lines in the rows (a1 per AR row, s1 per verified row), so a step with any
  speculative sequence costs s0 + s1 x rows, an AR-only one a0 + a1 x rows.
* Table: pure costs are the measured (batch, block) entries, which are not one function of rows (2026-12-03, CPU:
  16 rows cost 20.8 ms as 1 x block 16, 22.1 ms as 4 x block 4, 21.1 ms as 16 AR), so pure steps keep them and a
  mixed step reads ``rows_s``: every measured entry as a point at its rows, equal rows averaged, piecewise linear
  (orchestrator/routing/step_costs.py ``StepCostTable.at_rows``, the router's reading), then over context.
* Roofline: the target forward is a function of its rows (weights touched, FLOPs, communication) and of its
  sequences (KV read), cluster.planning.roofline.target_rows_step; the drafter runs once over the speculative
  sequences, padded to their largest block (workers/speculative/dflash.py). Pure steps give ar_s / spec_s exactly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.routing.step_costs import rows_curve
from workers.engine.stats import pure_step


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

    def decode_s(self, blocks: list[int], ctx: int = 0) -> float:
        """One decode step of sequences at these blocks (1 = AR): its rows on the AR line when every sequence is
        AR, else on the speculative line (one drafter + verify pass carries the AR rows too)."""
        if not blocks:
            return 0.0
        rows = sum(blocks)
        return self.a0 + self.a1 * rows if all(b <= 1 for b in blocks) else self.s0 + self.s1 * rows

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


def interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs ascending, ys); ys[0] at or below xs[0]; beyond xs[-1] the last segment's
    slope, never negative (a cost does not fall with more work); one point: that value."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return ys[-1] + slope * (x - xs[-1])


def _row(raw: dict) -> tuple[list[int], list[float]]:
    pts = sorted((int(b), float(ms)) for b, ms in raw.items())
    return [b for b, _ in pts], [ms for _, ms in pts]


@dataclass
class TableStepModel:
    """Measured step costs: ``tables`` = {context tokens: {"ar_ms": {batch: ms}, "spec_ms": {block: {batch: ms}}}}
    (workers/engine/calibrate.py's StepCosts JSON form, at each context length measured); prefill =
    ``prefill_ms_fixed`` + ``prefill_ms_per_token`` x tokens. Read piecewise linearly over batch, over block
    (block 1 = the AR step) and over context (the first table's costs below its context)."""

    tables: dict
    prefill_ms_per_token: float
    prefill_ms_fixed: float = 0.0
    source: str = ""
    factor: float = 1.0  # a slow-down applied to every cost (``scaled``)

    def __post_init__(self) -> None:
        self.tables = {str(int(c)): t for c, t in self.tables.items()}
        self._ctx = sorted(int(c) for c in self.tables)
        if not self._ctx:
            raise ValueError("a step table needs at least one measured context")
        self._ar, self._spec = {}, {}
        for c in self._ctx:
            t = self.tables[str(c)]
            if not t.get("ar_ms"):
                raise ValueError(f"the step table at context {c} has no AR costs")
            self._ar[c] = _row(t["ar_ms"])
            self._spec[c] = {int(k): _row(v) for k, v in (t.get("spec_ms") or {}).items() if v}
        # every entry measured at a context as (rows = batch x block, ms), equal rows averaged: the router's reading
        self._rows = {c: rows_curve(self._ar[c], self._spec[c]) for c in self._ctx}

    def _at_ctx(self, ctx: int, cost) -> float:
        ys = [cost(c) for c in self._ctx]
        return self.factor * interp(self._ctx, ys, max(0, ctx)) / 1000.0

    def ar_s(self, batch: int, ctx: int = 0) -> float:
        return self._at_ctx(ctx, lambda c: interp(*self._ar[c], max(1, batch)))

    def spec_s(self, batch: int, block: int, ctx: int = 0) -> float:
        def cost(c: int) -> float:
            b = max(1, batch)
            blocks = sorted(self._spec[c])
            if not blocks:  # no speculative step measured (an AR-only engine): a block costs a verify of its tokens
                return interp(*self._ar[c], b * block)
            xs = [1, *blocks]
            ys = [interp(*self._ar[c], b), *(interp(*self._spec[c][k], b) for k in blocks)]
            return interp(xs, ys, block)

        return self._at_ctx(ctx, cost)

    def rows_s(self, rows: int, ctx: int = 0) -> float:
        """A decode step of ``rows`` target rows, whatever mix of AR and speculative sequences makes them."""
        return self._at_ctx(ctx, lambda c: interp(*self._rows[c], max(1, rows)))

    def decode_s(self, blocks: list[int], ctx: int = 0) -> float:
        """One decode step of sequences at these blocks (1 = AR): a pure step at its measured (batch, block)
        cost, a mixed one at its rows."""
        if not blocks:
            return 0.0
        pure = pure_step(blocks)
        if pure is None:
            return self.rows_s(sum(blocks), ctx)
        batch, block = pure
        return self.ar_s(batch, ctx) if block <= 1 else self.spec_s(batch, block, ctx)

    def prefill_s(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.factor * (self.prefill_ms_fixed + self.prefill_ms_per_token * tokens) / 1000.0

    def scaled(self, factor: float) -> "TableStepModel":
        return TableStepModel(self.tables, self.prefill_ms_per_token, self.prefill_ms_fixed,
                              self.source + f" x{factor:g}", self.factor * factor)

    def to_dict(self) -> dict:
        return {"kind": "step_table", "tables": self.tables,
                "prefill_ms_per_token": self.prefill_ms_per_token, "prefill_ms_fixed": self.prefill_ms_fixed,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "TableStepModel":
        return cls(d["tables"], float(d["prefill_ms_per_token"]),
                   float(d.get("prefill_ms_fixed", 0.0)), str(d.get("source", "")))


def load_step_model(path: str | Path):
    """A step-model JSON: benchmarks/calibrate.py's table (``tables``) or a LinearStepModel (``a0``...)."""
    d = json.loads(Path(path).read_text())
    if "tables" in d:
        return TableStepModel.from_dict(d)
    if "a0" in d:
        return LinearStepModel(**{k: d[k] for k in ("a0", "a1", "s0", "s1", "p1")}, source=d.get("source", ""))
    raise ValueError(f"{path}: neither a step table (benchmarks/calibrate.py) nor a LinearStepModel")


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

    def decode_s(self, blocks: list[int], ctx: int = 1024) -> float:
        """One decode step of sequences at these blocks (1 = AR): one target forward over all their rows and KV,
        plus one drafter pass over the speculative sequences at their largest block (pure: ar_s / spec_s)."""
        from cluster.planning.roofline import drafter_step, target_rows_step

        if not blocks:
            return 0.0
        ctx = max(1, ctx)
        t = target_rows_step(self.model, self.node, self.tp, sum(blocks), len(blocks), ctx).total_s
        spec = [b for b in blocks if b > 1]
        if spec and self.drafter is not None:
            t += drafter_step(self.drafter, self.model, self.node, self.tp, len(spec), max(spec), ctx).total_s
        return t

    def prefill_s(self, tokens: int) -> float:
        from cluster.planning.roofline import target_step

        if tokens <= 0:
            return 0.0
        chunks = max(1, round(tokens / self.chunk))
        return chunks * target_step(self.model, self.node, self.tp, 1, min(tokens, self.chunk), self.chunk).total_s
