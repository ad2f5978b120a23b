"""Measured step costs as the router reads them (pure, torch-free).

A real engine measures its own steps at start-up (workers/engine/calibrate.py, ``EngineConfig.
calibrate_step_costs``) and reports the table in ``EngineStats.step_costs``; the mock engine reports a table of
its own step model. JSON form, string keys; batches the engine could not hold and blocks beyond its drafter's are
absent, so a table may be partial:

    {"ar_ms": {batch: ms}, "spec_ms": {block: {batch: ms}}, "draft_ms": {block: {batch: ms}}}

``StepCostTable.parse`` reads it once per report (entries that are not a positive finite ms are dropped; equal
tables parse to one shared object, so the scorer's memo keys hit by identity). The scorer reads it through:

* ``ar_at(batch)``: piecewise linear between measured batches; below the smallest measured batch, that batch's
  cost; beyond the largest, the last segment's slope (never negative, so never below the smallest measured
  cost); a row of one measured batch grows by ``slope_one`` (relative, per sequence) beyond it.
* ``spec_at(batch, block)``: each measured block's row read over batch as above, then piecewise linear over the
  block with block 1 = the AR step (a block between 1 and the smallest measured one lies on the AR-to-first
  segment; beyond the largest measured block, the last segment's slope, never negative).

* ``at_rows(rows)``: the step as a function of its target rows alone (batch x block: 1 per AR sequence, the block
  per speculative one), piecewise linear through every measured entry (entries of equal rows averaged). On the CPU
  this describes every entry to a few percent (2026-12-03: 16 rows cost 20.8 ms as 1 x block 16, 22.1 ms as
  4 x block 4, 21.1 ms as 16 AR), and it is what prices a step that mixes AR and speculative rows, which no
  (batch, block) entry describes.

``draft_ms`` (the drafter's share of a speculative step) is carried and reported, not scored.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

Row = tuple[tuple[int, ...], tuple[float, ...]]  # (measured batches ascending, ms at each)


def _ms(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) and x > 0.0 else None


def _key(k: Any) -> int | None:
    """A batch or block key: what int() reads (JSON keys are strings), else None."""
    try:
        return int(k)
    except (TypeError, ValueError, OverflowError):
        return None


def _row(raw: Any) -> Row:
    """{batch: ms} (any keys int() reads) -> a sorted row; bad entries dropped."""
    if not isinstance(raw, dict):
        return (), ()
    pts = {}
    for k, v in raw.items():
        b, ms = _key(k), _ms(v)
        if b is not None and b >= 1 and ms is not None:
            pts[b] = ms
    keys = tuple(sorted(pts))
    return keys, tuple(pts[b] for b in keys)


def _blocks(raw: Any) -> dict[int, Row]:
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        blk = _key(k)
        if blk is not None and blk >= 2:
            row = _row(v)
            if row[0]:
                out[blk] = row
    return dict(sorted(out.items()))


def interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float, slope_one: float = 0.0) -> float:
    """Piecewise linear through (xs, ys) at x; ys[0] at or below xs[0]; beyond xs[-1] the last segment's slope
    (clamped at 0), or ``slope_one`` x ys[0] per unit where only one point is measured."""
    if x <= xs[0]:
        return ys[0]
    n = len(xs)
    if n == 1:
        return ys[0] * (1.0 + slope_one * (x - xs[0]))
    for i in range(1, n):
        if x <= xs[i]:
            if x == xs[i]:
                return ys[i]
            x0, y0 = xs[i - 1], ys[i - 1]
            return y0 + (ys[i] - y0) * (x - x0) / (xs[i] - x0)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (x - xs[-1]) if slope > 0.0 else ys[-1]


def rows_curve(ar: Row, spec: dict[int, Row]) -> Row:
    """Every entry of a table as a point at its target rows (AR: the batch; speculative: batch x block), entries of
    equal rows averaged: (rows ascending, ms). ``at_rows`` reads it; so does the simulator's table step model
    (benchmarks/stepmodel.py) for a mixed step."""
    pts: dict[int, list[float]] = {}
    for b, ms in zip(*ar):
        pts.setdefault(b, []).append(ms)
    for k, (bs, ms_row) in spec.items():
        for b, ms in zip(bs, ms_row):
            pts.setdefault(b * k, []).append(ms)
    xs = tuple(sorted(pts))
    return xs, tuple(sum(pts[x]) / len(pts[x]) for x in xs)


class StepCostTable:
    """A replica's measured step costs, parsed (immutable, hashable, shared between equal tables)."""

    __slots__ = ("ar", "spec", "draft", "blocks", "token", "_key", "_hash", "_at", "_rows")

    def __init__(self, ar: Row, spec: dict[int, Row], draft: dict[int, Row]):
        self.ar, self.spec, self.draft = ar, spec, draft
        self.blocks = tuple(spec)  # measured speculative blocks, ascending
        self._key = (ar, tuple(spec.items()), tuple(draft.items()))
        self._hash = hash(self._key)
        self.token = next(_SERIAL)  # names this object in memo keys (a plain int hashes in C); equal values
        #                             parse to one object (interned), so equal tables mostly share a token
        self._at: dict[tuple[int, float], tuple[float, ...]] = {}  # (batch, slope_one) -> (ar, spec per block)
        self._rows: Row | None = None  # (rows ascending, ms): at_rows' curve, built on first use

    @classmethod
    def parse(cls, raw: Any) -> StepCostTable | None:
        """The reported JSON table -> a table; None for None / {} / a table without any measured AR step
        (nothing the router can anchor on). Raises ValueError when it is not a dict."""
        if raw is None:
            return None
        if isinstance(raw, StepCostTable):
            return raw if raw.ar[0] else None
        if not isinstance(raw, dict):
            raise ValueError(f"step_costs must be a dict, got {type(raw).__name__}")
        ar = _row(raw.get("ar_ms"))
        if not ar[0]:
            return None
        table = cls(ar, _blocks(raw.get("spec_ms")), _blocks(raw.get("draft_ms")))
        hit = _INTERNED.get(table._key)
        if hit is not None:
            return hit
        if len(_INTERNED) >= 1024:
            _INTERNED.clear()
        _INTERNED[table._key] = table
        return table

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (string keys), as the engine reports it."""
        row = lambda r: {str(b): ms for b, ms in zip(*r)}  # noqa: E731
        return {"ar_ms": row(self.ar), "spec_ms": {str(k): row(r) for k, r in self.spec.items()},
                "draft_ms": {str(k): row(r) for k, r in self.draft.items()}}

    # ---------------------------------------------------------------- reading
    def _costs(self, batch: int, slope_one: float) -> tuple[float, ...]:
        """(AR, spec at each measured block) at this batch; kept per (batch, slope) on the table."""
        key = (batch, slope_one)
        out = self._at.get(key)
        if out is None:
            if len(self._at) >= 4096:
                self._at.clear()
            out = self._at[key] = (interpolate(*self.ar, batch, slope_one),
                                   *(interpolate(*r, batch, slope_one) for r in self.spec.values()))
        return out

    def ar_at(self, batch: int, slope_one: float = 0.0) -> float:
        """ms of one AR decode step with ``batch`` running sequences."""
        return self._costs(batch, slope_one)[0]

    def spec_at(self, batch: int, block: int, slope_one: float = 0.0) -> float:
        """ms of one speculative step (drafter + verify) at ``block`` with ``batch`` running sequences; with no
        measured block, the AR step (the caller decides what an unmeasured speculative step costs)."""
        costs = self._costs(batch, slope_one)
        return interpolate((1, *self.blocks), costs, block)

    def at_rows(self, rows: float) -> float:
        """ms of a decode step of ``rows`` target rows, whatever mix of AR and speculative sequences makes them."""
        curve = self._rows
        if curve is None:
            curve = self._rows = rows_curve(self.ar, self.spec)
        return interpolate(*curve, rows)

    # ---------------------------------------------------------------- identity
    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, StepCostTable) and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"StepCostTable(ar={dict(zip(*self.ar))}, spec={ {k: dict(zip(*r)) for k, r in self.spec.items()} })"


_INTERNED: dict[tuple, StepCostTable] = {}
_SERIAL = itertools.count(1)
