"""Pure, torch-free replica scoring: where does this request run fastest without running out of KV?

``rank(request, replicas, cfg)`` returns one ``Choice`` per eligible replica, best first. The score is
the request's expected goodput in tokens/s on that replica:

    rate      = tau_hat(B) / t_step(batch+1, B)          (speculative, block B)  or  1 / t_ar(batch+1)
    T         = queue_wait + prefill(uncached prompt) + max_tokens / rate
    score     = (max_tokens / T  -  slowdown imposed on the replica's running requests) x kv_pressure

tau_hat: the session's measured acceptance on that replica, shrunk towards its role prior, team prior and
the replica mean (each worth ``prior_strength`` steps), plus a UCB exploration bonus for few samples.
Acceptance is modelled as i.i.d. per position (alpha) so a tau reported at the drafter's block size
(workers/engine/acceptance.py: from every pass, whatever its block) predicts tau at a smaller block; speculation is steered per request: the block maximising
tau(B)/t_spec(B) is used when it beats 1/t_ar by ``spec_margin``, else ``SpecParams(enabled=False)``.
Replicas whose free KV < (uncached prompt + max_tokens + block) x kv_safety are excluded.
Step times (``step_times``): the replica's measured step-cost table (start-up calibration, step_costs.py),
interpolated over batch and block and corrected by its live EWMAs; without one its EWMAs scaled by
``batch_slope``; with nothing measured a guess (``default_step_ms``, ``spec_cost_ratio``).

Mixed steps (``mixed_step_times``): a replica that reports its decode-step EWMAs (the real engine: ms, target rows
and committed tokens per step, mixed steps included) and a step-cost table is priced by rows. Its running
sequences share one step of R rows committing S tokens; this request at block b (1 = AR) makes it R + b rows,
t_b = T(R + b) x f (T: the table read by rows, ``StepCostTable.at_rows``; f: the live step over T at its rows).
The request's rate is tau(b) / t_b and the others lose S x (1 / t_now - 1 / t_b) tokens/ms; the block is chosen
on the sum, the replica's goodput change, not on the request's own rate. Choosing by the own rate, with every
running sequence assumed at the same block, ran block 2 on 76 of 96 turns at concurrency 16 in never_slower and
delivered 0.76x of static AR (2026-12-03): at 16 rows a block-2 row costs the other 15 sequences more than it gains.
Requests routed since the report count at what the router decided for them (``step_share``: the block as rows,
tau_hat at it as tokens; 1 and 1 for AR), so in a burst on an idle replica the later requests see the blocks the
first ones took (counted as AR rows, the first arrivals took large blocks the later ones never saw).

Cost: O(replicas), a few dict / set lookups and some arithmetic per replica. What depends only on a report
(blocks, step times at the batch) and alpha per tau are memoised on their inputs (pure: the same inputs give
the same floats); alpha is Newton's root certified to be the bisection's result. benchmarks/router_cost.py.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.routing.stats import ReportedTaus, RoutingStats
from orchestrator.routing.step_costs import StepCostTable
from workers.engine.params import SpecParams

REASONS = ("only", "headroom", "affinity", "explore", "acceptance", "load")


class RouterWeights(BaseModel):
    """Router knobs (embedded in ServeConfig as ``router``)."""

    model_config = ConfigDict(extra="forbid")

    kv_safety: float = Field(1.2, ge=1.0, description="exclude if free KV < need x this")
    min_vram_free_bytes: int = Field(0, ge=0, description="exclude replicas with less free VRAM (GPU only)")
    prior_strength: float = Field(8.0, gt=0, description="steps of evidence a prior is worth")
    explore: float = Field(0.3, ge=0, description="UCB exploration coefficient, in tau units")
    tau_default: float = Field(2.0, ge=1.0, description="tau assumed with no measurement at all")
    affinity: float = Field(1.0, ge=0, description="weight on the prefill saved by a cached prefix")
    queue: float = Field(1.0, ge=0, description="weight on the predicted queueing delay")
    congestion: float = Field(1.0, ge=0, description="weight on the slowdown imposed on running requests")
    kv_watermark: float = Field(0.85, gt=0, lt=1, description="KV use above which the score is damped")
    kv_pressure: float = Field(0.5, ge=0, le=1, description="damping at full KV")
    steer_spec: bool = Field(True, description="turn speculation off where it is a loss")
    steer_block: bool = Field(True, description="choose the block size per request")
    spec_margin: float = Field(1.05, gt=0, description="speculate when its rate beats AR by this factor")
    spec_probe_every: int = Field(
        8, ge=0, description="after this many steered-off turns of a session, speculate once to re-measure "
        "its acceptance (with speculation off no acceptance is observed, so 'off' would never be revisited); 0 = never")
    block_sizes: list[int] = Field(default_factory=list, description="candidate blocks (default: measured)")
    default_step_ms: float = Field(20.0, gt=0, description="AR step time before any measurement")
    default_prefill_ms_per_token: float = Field(0.5, ge=0)
    batch_slope: float = Field(0.03, ge=0, description="relative step-time growth per extra sequence, where "
                               "no step-cost table measured it (EWMAs; a table row of one batch)")
    spec_cost_ratio: float = Field(1.5, ge=1.0, description="spec step / AR step at block 16, assumed only "
                                   "where the replica measured no speculative step")


@dataclass
class RouteRequest:
    session_id: str | None = None
    role: str | None = None
    team: str | None = None
    prompt_tokens: int = 0
    max_tokens: int = 128
    spec_requested: SpecParams | None = None  # the client's explicit choice; None = let the router steer
    prefix_tokens: int = 0  # tokens of earlier turns (KV resident where the session is cached)
    spec_off_turns: int = 0  # consecutive earlier turns of this session the router ran without speculation


@dataclass
class Choice:
    replica_id: str
    score: float  # predicted goodput of this request, tokens/s
    reason: str
    spec: SpecParams
    tau_hat: float = 1.0  # predicted tokens per target pass under `spec`
    detail: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ acceptance model
def tau_at_block(tau0: float, b0: int, b: int) -> float:
    """Expected committed tokens per pass at block b, given tau0 measured at block b0 (i.i.d. alpha)."""
    return _Taus(tau0, b0).at(b)


class _Taus:
    """tau(b) for one tau0 measured at block b0, alpha solved at most once (tau_at_block for many b)."""

    __slots__ = ("tau0", "b0", "alpha")

    def __init__(self, tau0: float, b0: int):
        self.tau0, self.b0, self.alpha = tau0, b0, None

    def at(self, b: int) -> float:
        if b == self.b0 or self.b0 < 2:
            return max(1.0, min(self.tau0, float(b)))
        if self.alpha is None:
            self.alpha = alpha_from_tau(self.tau0, self.b0)
        alpha = self.alpha
        if alpha >= 1.0:
            return float(b)
        return (1.0 - alpha**b) / (1.0 - alpha)


_GRID = 2.0**-40  # the bisection's resolution: 40 halvings of [0, 1]


def alpha_from_tau(tau: float, b: int) -> float:
    """Per-position acceptance alpha with sum_{k<b} alpha^k = tau (tau clamped to [1, b]): the midpoint of
    the 2^-40-wide interval that 40 bisection steps over [0, 1] end in (``_bisect_alpha``).

    Fast path, same result: Newton's method finds the root, which names that interval; two evaluations of
    the bisection's own expression at its ends certify it. Where the computed sum is monotone at the
    grid's resolution (alpha <= 0.99, b <= 64: rounding error < 1e-13 against a step >= 2^-40 ~ 9e-13) the
    bisection, comparing at grid points only, must end in the one interval whose lower end sums below tau
    and whose upper end does not. Elsewhere, or when the check fails, the bisection itself runs."""
    tau, fb = float(tau), float(b)  # max(1.0, min(tau, b)), as comparisons
    if fb < tau:
        tau = fb
    if not tau > 1.0:
        tau = 1.0
    if tau >= b - 1e-9:
        return 1.0
    key = (tau, b)
    alpha = _ALPHA_MEMO.get(key)
    if alpha is None:
        alpha = _ALPHA_MEMO.put(key, _solve_alpha(tau, b))
    return alpha


class _Memo(OrderedDict):
    """A memo of a pure function (the same key, the same value) holding at most ``size`` entries: past that, the
    oldest entry is dropped, one per new entry. Clearing a full memo at once paused the decision that filled it
    (~0.2 ms for 8,192 alphas, every ~130 decisions at 64 replicas: the p99)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


_MEMO_SIZE = 8192  # entries per memo below
_ALPHA_MEMO: _Memo = _Memo(_MEMO_SIZE)  # a tau repeats across decisions where no session or team
#                                                  entry makes it specific (a role's, the replica mean)


def _solve_alpha(tau: float, b: int) -> float:
    if b <= 64:
        # the cubic-Hermite start itself (within one 2^-40 cell of the root ~96 % of the time), certified; else one
        # Newton step from it, certified; else Newton to convergence, certified; else the bisection. Every path
        # returns the bisection's float (the certificate names its cell): the start only changes which path runs.
        grid = _STARTS.get(b) or _start_grid(b)
        slopes = _SLOPES[b]
        x = (tau - 1.0) * (_START_N / (b - 1))
        i = min(int(x), _START_N - 1)
        u = x - i
        h = (b - 1) / _START_N
        u2 = u * u
        u3 = u2 * u
        a = ((2.0 * u3 - 3.0 * u2 + 1.0) * grid[i] + (u3 - 2.0 * u2 + u) * h * slopes[i]
             + (3.0 * u2 - 2.0 * u3) * grid[i + 1] + (u3 - u2) * h * slopes[i + 1])
        for attempt in (0, 1, 2):
            if attempt == 1 and 0.0 <= a < 1.0:  # one Newton step from the Hermite start
                ab1 = a ** (b - 1)
                s = (1.0 - ab1 * a) / (1.0 - a)
                ds = (s - b * ab1) / (1.0 - a)
                if ds <= 0.0:
                    continue
                a -= (s - tau) / ds
            elif attempt == 2:  # Newton to convergence from the linear start
                a = _newton_alpha(tau, b)
                if a is None:
                    break
            if not 0.0 <= a < 1.0:
                continue
            j = int(a / _GRID)
            for k in (j, j - 1, j + 1):  # _geo inlined: the bisection's own expression at the cell's ends
                lo, hi = k * _GRID, (k + 1) * _GRID
                if (k >= 0 and hi <= 0.99 and (k == 0 or (1.0 - lo**b) / (1.0 - lo) < tau)
                        and (1.0 - hi**b) / (1.0 - hi) >= tau):
                    return 0.5 * (lo + hi)
    return _bisect_alpha(tau, b)


def _geo(a: float, b: int) -> float:
    """sum_{k<b} a^k, computed exactly as the bisection computes it."""
    return (1.0 - a**b) / (1.0 - a)


def _bisect_alpha(tau: float, b: int) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        val = (1.0 - mid**b) / (1.0 - mid)
        lo, hi = (mid, hi) if val < tau else (lo, mid)
    return 0.5 * (lo + hi)


def _newton_alpha(tau: float, b: int, start: float | None = None) -> float | None:
    """The root of sum_{k<b} a^k = tau in [0, 1) by Newton's method (None where it leaves [0, 1)). It starts at
    ``start`` (by default alpha interpolated on ``_start_grid``, ~1e-6 off, so one or two steps do), or
    at 1 - 1/tau (the infinite sum's root, below this one) where the grid's point is not above that bound."""
    low = 1.0 - 1.0 / tau
    if start is not None:
        a = start
    else:
        grid = _STARTS.get(b) or _start_grid(b)
        x = (tau - 1.0) * (_START_N / (b - 1))
        i = min(int(x), _START_N - 1)
        a = grid[i] + (grid[i + 1] - grid[i]) * (x - i)
    if not low <= a < 1.0:
        a = low
    for _ in range(60):
        ab1 = a ** (b - 1)
        s = (1.0 - ab1 * a) / (1.0 - a)
        ds = (s - b * ab1) / (1.0 - a)  # d/da of the sum
        if ds <= 0.0:
            return None
        step = (s - tau) / ds
        a -= step
        if not 0.0 <= a < 1.0:
            return None
        if -1e-8 < step < 1e-8:  # the error left is ~ b * step^2 < 1e-14, far inside one 2^-40 cell
            return a
    return None


_START_N = 4096  # grid intervals over tau in [1, b]
_STARTS: dict[int, list[float]] = {}  # b -> alpha at tau = 1 + i (b - 1) / _START_N, i = 0.._START_N
_SLOPES: dict[int, list[float]] = {}  # b -> d alpha / d tau at the same points (Hermite interpolation)


def _start_grid(b: int) -> list[float]:
    """Newton's starting points for block b: alpha on a grid of tau over [1, b] (built once per b, ~5 ms), linearly
    interpolated by ``_newton_alpha``, and with d alpha / d tau at each point (``_SLOPES``) cubic-Hermite interpolated
    by ``_solve_alpha`` (mostly within one 2^-40 cell of the root: certified without a Newton step). Only a start: the result is still certified against the bisection's cells
    (``_solve_alpha``), so the grid changes how many steps Newton takes (1.3 on average at b = 16, against 3.4 from
    1 - 1/tau), never the result. Where Newton fails on a grid point (alpha near 1), the point is 1 - 1/tau."""
    h = (b - 1) / _START_N
    grid = []
    for i in range(_START_N + 1):
        t = 1.0 + i * h
        a = _newton_alpha(t, b, 1.0 - 1.0 / t) if t < b - 1e-9 else 1.0
        grid.append(1.0 - 1.0 / t if a is None else a)
    slopes = []
    for a in grid:  # d alpha / d tau = 1 / (d tau / d alpha); at alpha = 1, d tau / d alpha = b (b - 1) / 2
        if a >= 1.0:
            slopes.append(2.0 / (b * (b - 1)))
        else:
            sa = (1.0 - a**b) / (1.0 - a)
            slopes.append((1.0 - a) / (sa - b * a ** (b - 1)))
    _SLOPES[b] = slopes
    _STARTS[b] = grid
    return grid


def estimate_tau(req: RouteRequest, r: RoutingStats, cfg: RouterWeights) -> tuple[float, int]:
    """(tau_hat at r.block_size_default, samples behind the most specific estimate)."""
    taus, ns = _estimates(req, [r], cfg)
    return taus[0], ns[0]


def _estimates(req: RouteRequest, replicas: list[RoutingStats], cfg: RouterWeights) -> tuple[list[float], list[int]]:
    """``estimate_tau`` for each replica, in one loop: the replica mean (else ``tau_default``) shrunk by the team's,
    then the role's, then the session's entry (each (tau, n) with n > 0 moves the estimate to
    (n tau + k prior) / (n + k), k = ``prior_strength``); n from the most specific entry present."""
    k = cfg.prior_strength
    default = cfg.tau_default
    team, role, sid = req.team, req.role, req.session_id
    taus, ns = [], []
    for r in replicas:
        est = r.tau_mean
        if est is None:
            est = default
        n = 0
        # each lookup as ReportedTaus.get / dict.get returns it; a reported (float, int) entry is used as it is
        # (the check inlined: no method call per table and replica), anything else goes through the table's get
        if team:
            tab = r.tau_by_team
            x = (tab._raw if type(tab) is ReportedTaus else tab).get(team)
            if x is not None and not (type(x) is tuple and len(x) == 2 and type(x[0]) is float
                                      and type(x[1]) is int and x[0] - x[0] == 0.0):
                x = tab.get(team)
            if x and x[1] > 0:
                t, n = x
                est = (n * t + k * est) / (n + k)
        if role:
            tab = r.tau_by_role
            x = (tab._raw if type(tab) is ReportedTaus else tab).get(role)
            if x is not None and not (type(x) is tuple and len(x) == 2 and type(x[0]) is float
                                      and type(x[1]) is int and x[0] - x[0] == 0.0):
                x = tab.get(role)
            if x and x[1] > 0:
                t, n = x
                est = (n * t + k * est) / (n + k)
        if sid:
            tab = r.tau_by_session
            x = (tab._raw if type(tab) is ReportedTaus else tab).get(sid)
            if x is not None and not (type(x) is tuple and len(x) == 2 and type(x[0]) is float
                                      and type(x[1]) is int and x[0] - x[0] == 0.0):
                x = tab.get(sid)
            if x and x[1] > 0:
                t, n = x
                est = (n * t + k * est) / (n + k)
        taus.append(est)
        ns.append(n)
    return taus, ns


# ------------------------------------------------------------------ step-time model
LIVE_FACTOR = (0.25, 4.0)  # bounds of the live correction of a measured table (EWMA / table at the batch)


def step_times(r: RoutingStats, cfg: RouterWeights, batch: int, blocks: list[int]) -> tuple[float, dict[int, float]]:
    """(t_ar(batch) ms, {block: t_spec(batch, block) ms}) for a replica with `batch` running sequences, from
    the best the replica measured: (a) its step-cost table (start-up calibration), interpolated over batch and
    block and scaled by the live correction (``live_factors``); (b) an explicit linear model; (c) its step-time
    EWMAs scaled to the batch by ``batch_slope``; (d) with nothing measured, ``default_step_ms`` and the
    guessed ``spec_cost_ratio``."""
    tab = r.step_costs
    if tab is not None:
        return _table_times(r, cfg, tab, batch, blocks)
    if r.step_base_ms is not None and r.step_per_token_ms is not None:
        base, per = r.step_base_ms, r.step_per_token_ms
        draft = r.draft_ms or 0.0
        return base + per * batch, {b: base + per * batch * b + draft for b in blocks}
    b0 = max(r.num_running, 1)
    scale = max(0.1, 1.0 + cfg.batch_slope * (batch - b0))
    t_ar = (r.step_ms_ar if r.step_ms_ar else cfg.default_step_ms) * scale
    measured = {b: t * scale for b, t in r.step_ms_by_block.items() if t > 0}
    return t_ar, _spec_from(t_ar, measured, blocks, cfg)


def _spec_from(t_ar: float, measured: dict[int, float], blocks: list[int], cfg: RouterWeights) -> dict[int, float]:
    """Speculative step times where no table measured them: the EWMAs at their blocks, linear in tokens per
    pass through the nearest measured block elsewhere, the guessed ``spec_cost_ratio`` with none."""
    out = {}
    for b in blocks:
        if b in measured:
            out[b] = measured[b]
        elif measured:  # linear in tokens per pass through the nearest measured block
            bm = min(measured, key=lambda m: abs(m - b))
            out[b] = t_ar + (measured[bm] - t_ar) * b / bm
        else:
            out[b] = t_ar * (1.0 + (cfg.spec_cost_ratio - 1.0) * b / 16.0)
    return out


def _table_times(r: RoutingStats, cfg: RouterWeights, tab: StepCostTable, batch: int, blocks: list[int]):
    slope = cfg.batch_slope
    f_ar, f_spec = live_factors(r, cfg)
    t_ar = tab.ar_at(batch, slope) * f_ar
    if tab.blocks:
        return t_ar, {b: tab.spec_at(batch, b, slope) * f_spec for b in blocks}
    # the AR step measured, no speculative one (the calibration ran no block of this drafter): the EWMAs,
    # scaled to the batch by the measured AR row, else the guess, relative to the measured AR step
    b0 = max(r.step_batch if r.step_batch is not None else r.num_running, 1)
    scale = tab.ar_at(batch, slope) / tab.ar_at(b0, slope)
    return t_ar, _spec_from(t_ar, {b: t * scale for b, t in r.step_ms_by_block.items() if t > 0}, blocks, cfg)


def live_factors(r: RoutingStats, cfg: RouterWeights) -> tuple[float, float]:
    """(AR, speculative) correction of a measured table: the live EWMA at the batch it describes over the table
    at that batch (the machine's load drifts after start-up). The speculative factor is the mean over the blocks
    with an EWMA; each falls back to the other, then 1. Only while sequences run (``step_batch`` >= 1): an idle
    replica's EWMAs are from an earlier batch. Bounded by ``LIVE_FACTOR``.

    The EWMAs describe pure steps only: the engine records no step that mixes AR rows with speculative ones or
    blocks of different sizes (such a step, keyed by its largest block, read as a cheap speculative step and turned
    the table's "AR at batch 13-16" into block 2 on 58 of 83 turns in never_slower at concurrency 16, 2026-12-03).
    A floor of the speculative factor at the AR factor, tried first against that artefact, also hid real readings:
    at concurrency 1, where every step is pure, it kept speculation off on turns where static block 16 was 1.24x
    AR (never_slower, 15:28 UTC)."""
    tab = r.step_costs
    b0 = r.step_batch if r.step_batch is not None else r.num_running
    if tab is None or b0 < 1:
        return 1.0, 1.0
    slope = cfg.batch_slope
    f_ar = r.step_ms_ar / tab.ar_at(b0, slope) if r.step_ms_ar and r.step_ms_ar > 0 else None
    ratios = [t / tab.spec_at(b0, b, slope) for b, t in r.step_ms_by_block.items() if t > 0] if tab.blocks else []
    f_spec = sum(ratios) / len(ratios) if ratios else None
    lo, hi = LIVE_FACTOR
    f_ar, f_spec = (f_ar if f_ar is not None else f_spec), (f_spec if f_spec is not None else f_ar)
    if f_ar is None:
        return 1.0, 1.0
    return min(hi, max(lo, f_ar)), min(hi, max(lo, f_spec))


class _Model:
    """What a replica's score needs that does not depend on the request: its candidate blocks and step times at
    the batch it would run this request at (batch + 1) and at its current batch, the AR mode, the (block, step ms,
    block as a float) of each candidate, and ``tau_ar``: at a tau (at the drafter's block) up to this one no block
    can beat AR by ``spec_margin``, even at tau(b) = min(tau, b), an upper bound of the i.i.d. model's tau(b)
    (tau(b) grows with b up to tau at the drafter's block, and never exceeds b). The bound keeps a slack ``_SAFE``
    over the rounding in tau(b) (< 1e-5 relative, near alpha = 1), so where it settles a mode as AR, the exact
    comparison (``_best_mode``) would have chosen AR too: the same result, without solving alpha."""

    __slots__ = ("blocks", "t_ar", "t_spec", "t_ar_now", "t_spec_now", "ar_mode", "spec", "tau_ar", "s_now",
                 "pen_ar", "pen")

    def __init__(self, blocks: list[int], t_ar: float, t_spec: dict[int, float], t_ar_now: float,
                 t_spec_now: dict[int, float], spec_margin: float, s_now: float | None = None,
                 congestion: float = 1.0):
        self.blocks, self.t_ar, self.t_spec, self.t_ar_now, self.t_spec_now = blocks, t_ar, t_spec, t_ar_now, t_spec_now
        self.ar_mode = (1.0 / t_ar, 1.0, None)  # (rate tokens/ms, tau, block)
        self.spec = tuple((b, t_spec[b], float(b)) for b in blocks)
        # s_now: tokens per step of the running sequences, where steps are priced by rows (mixed_step_times); the
        # block is then chosen on rate - pen: pen = what the running sequences lose, tokens/ms (congestion-weighted)
        self.s_now = s_now
        w = congestion * (s_now or 0.0)
        self.pen_ar = w * (1.0 / t_ar_now - 1.0 / t_ar) if s_now and t_ar > t_ar_now else 0.0
        self.pen = {b: (w * (1.0 / t_ar_now - 1.0 / t) if s_now and t > t_ar_now else 0.0) for b, t, _ in self.spec}
        thr = self.ar_mode[0] * spec_margin - self.pen_ar
        # block b cannot win while max(1, min(tau, b)) / t_b x _SAFE <= thr + pen_b, i.e. tau <= cap =
        # (thr + pen_b) t_b / _SAFE where cap < b (no tau when cap < 1: tau(b) is at least 1)
        caps = [(thr + self.pen[b]) * t / _SAFE for b, t, _ in self.spec]
        if min(caps) < 1.0:
            self.tau_ar = -math.inf
        else:
            self.tau_ar = min((c for c, (_, _, fb) in zip(caps, self.spec) if c < fb), default=math.inf) * (1.0 - 1e-9)


_SAFE = 1.0 + 1e-4


_STEP_MEMO: _Memo = _Memo(_MEMO_SIZE)  # key -> _Model


def _step_cfg_key(cfg: RouterWeights) -> int:
    """The knobs _blocks, step_times and _Model read, as a number: one per distinct tuple of them, never reused (the
    step memo's key holds this int, not the tuple, which would be hashed again for every replica and decision)."""
    knobs = (cfg.steer_block, tuple(cfg.block_sizes), cfg.batch_slope, cfg.default_step_ms, cfg.spec_cost_ratio,
             cfg.spec_margin, cfg.congestion)
    token = _CFG_TOKENS.get(knobs)
    if token is None:
        if len(_CFG_TOKENS) >= 1024:  # bounded; tokens keep counting up, so a forgotten one is never reused
            _CFG_TOKENS.clear()
        token = _CFG_TOKENS[knobs] = next(_CFG_COUNTER)
    return token


_CFG_TOKENS: dict[tuple, int] = {}
_CFG_COUNTER = itertools.count()


def _step_model(r: RoutingStats, cfg: RouterWeights, cfg_key: int) -> _Model:
    """A replica's ``_Model``; memoised on what it is computed from (the same report and batch recur from decision
    to decision: a new report or a request counted in changes the key)."""
    key = (r.block_size_default, r.num_running, r.step_ms_ar, r.step_base_ms, r.step_per_token_ms, r.draft_ms,
           tuple(r.step_ms_by_block.items()), r.step_costs.token if r.step_costs is not None else 0, r.step_batch,
           r.decode_ms, r.decode_rows, r.decode_tokens, r.inflight_count, r.inflight_rows, r.inflight_tokens, cfg_key)
    out = _STEP_MEMO.get(key)
    if out is None:
        blocks = _blocks(r, cfg)
        mixed = mixed_step_times(r, blocks)
        if mixed is not None:
            t_now, s_now, t_ar, t_spec = mixed
            out = _Model(blocks, t_ar, t_spec, t_now, {b: t_now for b in blocks}, cfg.spec_margin, s_now,
                         cfg.congestion)
        else:
            batch, batch_now = r.num_running + 1, max(r.num_running, 1)
            t_ar, t_spec = step_times(r, cfg, batch, blocks)
            t_ar_now, t_spec_now = (t_ar, t_spec) if batch_now == batch else step_times(r, cfg, batch_now, blocks)
            out = _Model(blocks, t_ar, t_spec, t_ar_now, t_spec_now, cfg.spec_margin)
        out = _STEP_MEMO.put(key, out)
    return out


def mixed_step_times(r: RoutingStats, blocks: list[int]) -> tuple[float, float, float, dict[int, float]] | None:
    """(t_now, S, t_ar, {block: t_b}) ms by rows (module docstring, "Mixed steps"): the replica's step now, the
    tokens it commits per step, and the step with this request added as AR (1 row) or at each block (b rows);
    None where the replica reports no decode EWMAs or no table with a speculative row. Requests counted in since
    the report (``num_running`` over ``step_batch``) add the rows and tokens per step the router decided for them
    (``inflight_rows`` / ``inflight_tokens``, ``step_share``: a burst on an idle replica sees the blocks its first
    requests were given); extra sequences without them are taken as AR rows committing one token each; an idle
    replica (``step_batch`` 0) is read from the table as measured (its EWMAs describe an earlier batch). Values no
    engine reports give None (not finite, or step times that overflow) or are bounded (more tokens than rows: a row
    commits at most one token)."""
    tab = r.step_costs
    ms, rows, toks = r.decode_ms, r.decode_rows, r.decode_tokens
    if (tab is None or not tab.blocks or ms is None or rows is None or toks is None
            or not 0.0 < ms < math.inf or not 1.0 <= rows < math.inf or not -math.inf < toks < math.inf):
        return None
    b0 = r.step_batch if r.step_batch is not None else r.num_running
    if b0 >= 1:
        toks = 0.0 if toks < 0.0 else rows if toks > rows else toks
        lo, hi = LIVE_FACTOR
        f = min(hi, max(lo, ms / tab.at_rows(rows)))
    else:
        rows, toks, f = 0.0, 0.0, 1.0
    extra = r.num_running - b0 if r.num_running > b0 else 0
    n_in, rows_in, toks_in = r.inflight_count, r.inflight_rows, r.inflight_tokens
    if extra and n_in > 0 and 0.0 <= rows_in < math.inf and 0.0 <= toks_in < math.inf:
        # the requests counted in since the report at the rows and tokens the router decided for them; any other
        # extra sequence (num_running over step_batch without a decision behind it) as an AR row
        k = n_in if n_in < extra else extra
        share = 1.0 if k == n_in else k / n_in
        rows_add, toks_add = rows_in * share + (extra - k), toks_in * share + (extra - k)
        rows, toks = rows + rows_add, toks + (toks_add if toks_add < rows_add else rows_add)
    else:
        rows, toks = rows + extra, toks + extra
    t_ar = tab.at_rows(rows + 1.0) * f
    t_now = tab.at_rows(rows) * f if rows > 0.0 else t_ar
    t_spec = {b: tab.at_rows(rows + b) * f for b in blocks}
    if not (t_ar < math.inf and all(t < math.inf for t in t_spec.values())):
        return None
    return t_now, toks, t_ar, t_spec


_TOKEN_GRID = 1024.0  # step_share rounds tokens to multiples of 1/1024: sums of them (a router adds and takes away
#                       requests in flight in any order) are exact in floats, so the same requests give the same sum


def step_share(spec: SpecParams, tau_hat: float) -> tuple[int, float]:
    """(target rows, committed tokens) per step a request adds to its replica's shared step under the router's
    decision: the block and tau_hat at it (bounded to [1, block], on a 1/1024 grid) when speculating, else one AR
    row committing one token. What the router and the simulator record for a request in flight (``add_inflight``)."""
    if not spec.enabled:
        return 1, 1.0
    b = spec.block_size if spec.block_size >= 1 else 1
    if not tau_hat >= 1.0:  # also nan
        return b, 1.0
    t = tau_hat if tau_hat < b else float(b)
    return b, round(t * _TOKEN_GRID) / _TOKEN_GRID


def prepare(replicas: list[RoutingStats], cfg: RouterWeights | None = None) -> list[_Model]:
    """The replicas' step models (what ``rank`` computes per replica that depends on its report and batch, not on
    the request), memoised too. A caller whose stats objects never change (the router's parsed reports and their
    in-flight views) may keep them per object and hand them to ``rank(..., models=)``; built where a report is taken
    in, the next decision finds them ready. Changes no result."""
    cfg = cfg or RouterWeights()
    cfg_key = _step_cfg_key(cfg)
    return [_step_model(r, cfg, cfg_key) for r in replicas]


def _blocks(r: RoutingStats, cfg: RouterWeights) -> list[int]:
    """Candidate blocks: the configured ones; else the blocks the step-cost table measured and the drafter's;
    without measured speculative rows, the blocks with a live EWMA and the drafter's. With a table, EWMA keys do
    not add candidates: the engine keys a step by its largest block, which is a request's block cut short at its
    max_tokens as often as a block anyone chose (blocks 2 and 3 appeared so, and block 2 then ran 58 turns at
    concurrency 16 in never_slower, 2026-12-03)."""
    top = r.block_size_default
    if not cfg.steer_block:
        return [top]
    tab = r.step_costs
    if cfg.block_sizes:
        cands = set(cfg.block_sizes)
    elif tab is not None and tab.blocks:
        cands = set(tab.blocks) | {top}
    else:
        cands = set(r.step_ms_by_block) | {top}
    return sorted(b for b in cands if 2 <= b <= top) or [top]


# ------------------------------------------------------------------ one replica
# a replica's evaluation, as a plain tuple (built 64 times a decision at fleet scale: a tuple costs a fraction of a
# dataclass instance): (stats, eligible, score, score_no_affinity, score_no_explore, tau_hat, spec, steered_off,
# cached)
_Eval = tuple


def _evaluate(req: RouteRequest, replicas: list[RoutingStats], cfg: RouterWeights, taus: list[float],
              bonuses: list[float], probe: bool = False, models: list[_Model] | None = None) -> list[_Eval]:
    """Each replica's score for this request; taus[i] = estimate_tau(req, replicas[i], cfg)[0], probe = the request
    re-measures a steered-off session (``spec_probe_every``). One loop, the request's and the knobs' values read
    once. Per replica, what does not change between the three scores (with / without affinity, with / without
    exploration) is computed once: the replica's step model (memoised per report and batch), the best mode per
    tau, alpha per tau. A tau up to the model's ``tau_ar`` is AR without solving alpha, with exploration
    (tau0 + bonus) and then without it (tau0 <= tau0 + bonus) too; and AR with exploration is AR without it: the
    best speculative rate never falls as tau grows, in floats too (alpha is the bisection's cell, monotone in
    tau, and cells 2^-40 apart move alpha^b far more than pow's rounding; tests/cpu/test_rank_fast_paths.py)."""
    cfg_key = _step_cfg_key(cfg)
    sid, prompt, max_tokens, prefix_req = req.session_id, req.prompt_tokens, req.max_tokens, req.prefix_tokens
    steered = req.spec_requested is None and cfg.steer_spec and not probe  # the bound may settle AR
    kv_safety, min_vram, p_default = cfg.kv_safety, cfg.min_vram_free_bytes, cfg.default_prefill_ms_per_token
    watermark, pressure, affinity = cfg.kv_watermark, cfg.kv_pressure, cfg.affinity
    w_queue, w_congestion, explicit = cfg.queue, cfg.congestion, req.spec_requested is not None
    specs = {}  # the SpecParams of this ranking, one object per value (block, or -block for AR), shared by the
    #             Choices that carry it (nothing changes a Choice's spec in place; a decision copies it to a dict)
    out = []
    for i, (r, tau0, bonus) in enumerate(zip(replicas, taus, bonuses)):
        cached = bool(sid) and sid in r.cached_sessions
        prefix = min(prefix_req, prompt) if cached else 0
        bsd = r.block_size_default
        spec_ok = r.spec_available
        new_kv = (prompt - prefix) + max_tokens + (bsd if spec_ok else 1)
        kv_free = r.kv_free_tokens
        eligible = kv_free >= new_kv * kv_safety
        if r.vram_free_bytes is not None and r.vram_free_bytes < min_vram:
            eligible = False

        m = models[i] if models is not None else _step_model(r, cfg, cfg_key)
        alpha0 = None
        tau_b = tau0 + bonus
        if not spec_ok or (steered and tau_b <= m.tau_ar):
            mode = mode0 = m.ar_mode
        else:
            mode, alpha_b = _best_mode(req, r, cfg, m, tau_b, probe)
            if tau_b == tau0:
                mode0, alpha0 = mode, alpha_b
            elif steered and (mode is m.ar_mode or tau0 <= m.tau_ar):
                mode0 = m.ar_mode  # AR at tau0 + bonus: AR at tau0 (the best rate never falls with tau)
            else:
                mode0, alpha0 = _best_mode(req, r, cfg, m, tau0, probe)

        # the terms of the score that do not depend on the mode or the cached prefix
        p_ms = r.prefill_ms_per_token
        if p_ms is None:
            p_ms = p_default
        num_running, max_seqs = r.num_running, r.max_num_seqs
        # builtin max / min spelled as comparisons (the same result: the first argument unless the second is
        # strictly beyond it), a function call less each, ~6 per replica
        over_seqs = num_running + 1 - max_seqs
        ahead = r.num_waiting + (over_seqs if over_seqs > 0 else 0)
        kv_total = r.kv_total_tokens
        kv_after = 1.0 - (kv_free - new_kv) / kv_total if kv_total > 0 else 1.0
        damp = 1.0
        if kv_after > watermark:
            over = min(1.0, (kv_after - watermark) / (1.0 - watermark))
            damp = 1.0 - pressure * over

        # _mode_terms(r, cfg, m, mode, max_tokens, ahead), inlined (the same expressions, the same floats)
        rate, tau_m, blk = mode
        t_step = tau_m / rate
        decode_ms = max_tokens / rate
        queue_ms = ahead * decode_ms / (1 if 1 > max_seqs else max_seqs)
        t_now = m.t_spec_now.get(blk, m.t_ar_now) if blk else m.t_ar_now
        if t_step > t_now:
            others = m.s_now if m.s_now is not None else num_running * (r.tau_mean if (r.tau_mean and blk) else 1.0)
            loss = others * (1000.0 / t_now - 1000.0 / t_step)
        else:
            loss = 0.0
        queue_ms, loss = w_queue * queue_ms, w_congestion * loss
        prefill_ms = prompt - affinity * prefix
        prefill_ms = (prefill_ms if prefill_ms > 0.0 else 0.0) * p_ms
        s = (max_tokens / (queue_ms + prefill_ms + decode_ms) * 1000.0 - loss) * damp
        if prefix == 0:
            s_no_aff = s
        else:  # prefix 0 and 0.0 give the same floats
            s_no_aff = (max_tokens / (queue_ms + max(0.0, prompt - affinity * 0.0) * p_ms + decode_ms) * 1000.0
                        - loss) * damp
        if mode0 is mode or mode0 == mode:
            s_no_exp = s
        else:
            queue_ms, decode_ms, loss = _mode_terms(r, cfg, m, mode0, max_tokens, ahead)
            s_no_exp = (max_tokens / (queue_ms + prefill_ms + decode_ms) * 1000.0 - loss) * damp
        if blk is None:
            spec = specs.get(-bsd)
            if spec is None:
                spec = specs[-bsd] = SpecParams(enabled=False, block_size=bsd)
            tau = mode[1]
        else:
            spec = specs.get(blk)
            if spec is None:
                spec = specs[blk] = SpecParams(enabled=True, block_size=blk)
            # report the estimate, not the optimism: tau0 at the chosen block (as _Taus.at computes it)
            if blk == bsd or bsd < 2:
                fb = float(blk)
                tau = fb if fb < tau0 else tau0
                if not tau > 1.0:
                    tau = 1.0
            else:
                if alpha0 is None:
                    alpha0 = alpha_from_tau(tau0, bsd)
                tau = float(blk) if alpha0 >= 1.0 else (1.0 - alpha0**blk) / (1.0 - alpha0)
        steered_off = spec_ok and blk is None and not explicit
        out.append((r, eligible, s, s_no_aff, s_no_exp, tau, spec, steered_off, cached))
    return out


def _mode_terms(r: RoutingStats, cfg: RouterWeights, m: _Model, mode: tuple[float, float, int | None],
                max_tokens: int, ahead: int) -> tuple[float, float, float]:
    """(weighted queueing ms, decode ms, weighted slowdown of the running requests in tokens/s) of a mode: the
    score is (max_tokens / (queueing + prefill + decode) x 1000 - slowdown) x KV damping."""
    rate, tau, blk = mode
    t_step = tau / rate  # ms per target pass (rate = tau / t_step)
    decode_ms = max_tokens / rate
    queue_ms = ahead * decode_ms / max(r.max_num_seqs, 1)
    # slowdown of the replica's running requests when this one joins the batch
    t_now = m.t_spec_now.get(blk, m.t_ar_now) if blk else m.t_ar_now
    others = m.s_now if m.s_now is not None else r.num_running * (r.tau_mean if (r.tau_mean and blk) else 1.0)
    loss = others * (1000.0 / t_now - 1000.0 / t_step) if t_step > t_now else 0.0
    return cfg.queue * queue_ms, decode_ms, cfg.congestion * loss


def _best_mode(req: RouteRequest, r: RoutingStats, cfg: RouterWeights, m: _Model, tau: float,
               probe: bool) -> tuple[tuple[float, float, int | None], float | None]:
    """((rate tokens/ms, tau, block or None for AR), alpha solved for tau or None) on this replica for this tau
    (measured at the drafter's block): the block with the best tau(b) / t_spec(b), or AR where that does not beat
    AR by ``spec_margin``; the client's explicit choice where it made one."""
    ar = m.ar_mode
    req_spec = req.spec_requested
    bsd = r.block_size_default
    if req_spec is not None:  # the client decided; respect it (clamped to the drafter)
        if not req_spec.enabled:
            return ar, None
        b = min(req_spec.block_size, bsd)
        taus = _Taus(tau, bsd)
        tb = taus.at(b)
        if b in m.t_spec:
            t = m.t_spec[b]
        else:
            mixed = mixed_step_times(r, [b]) if m.s_now is not None else None
            t = mixed[3][b] if mixed is not None else step_times(r, cfg, r.num_running + 1, [b])[1][b]
        return (tb / t, tb, b), taus.alpha
    best = None
    alpha = None
    pen = m.pen
    for b, t, fb in m.spec:  # tau(b), as _Taus.at computes it
        if b == bsd or bsd < 2:
            tb = fb if fb < tau else tau  # max(1.0, min(tau, fb))
            if not tb > 1.0:
                tb = 1.0
        else:
            if alpha is None:
                alpha = alpha_from_tau(tau, bsd)
            tb = fb if alpha >= 1.0 else (1.0 - alpha**b) / (1.0 - alpha)
        cand = tb / t - pen[b]  # the request's rate less what the running sequences lose (0 unless mixed)
        if best is None or cand > best[0]:
            best = (cand, tb, b)
    if not cfg.steer_spec or probe or best[0] > ar[0] * cfg.spec_margin - m.pen_ar:
        cand, tb, b = best
        return (tb / m.t_spec[b], tb, b), alpha
    return ar, alpha


# ------------------------------------------------------------------ ranking
def _bonuses(replicas: list[RoutingStats], ns: list[int], cfg: RouterWeights) -> list[float]:
    """UCB bonus per replica: ns[i] samples behind its estimate, their total over replicas with a drafter."""
    total = sum(n for n, r in zip(ns, replicas) if r.spec_available)
    log_total = math.log(2.0 + total)
    return [
        cfg.explore * math.sqrt(log_total / (1.0 + n)) if r.spec_available else 0.0
        for n, r in zip(ns, replicas)
    ]


def rank(req: RouteRequest, replicas: list[RoutingStats], cfg: RouterWeights | None = None,
         models: list[_Model] | None = None) -> list[Choice]:
    """Eligible replicas, best first, each with its predicted goodput, reason and speculation choice.
    O(replicas): per replica a few table lookups (dicts, the cached-session set) and arithmetic. ``models``:
    ``prepare(replicas, cfg)``, where the caller keeps them (else they are looked up in the memo)."""
    cfg = cfg or RouterWeights()
    if not replicas:
        return []
    if models is not None and len(models) != len(replicas):
        raise ValueError(f"{len(models)} step models for {len(replicas)} replicas")
    taus, ns = _estimates(req, replicas, cfg)
    bonuses = _bonuses(replicas, ns, cfg)
    probe = cfg.spec_probe_every > 0 and req.spec_off_turns >= cfg.spec_probe_every
    evals = _evaluate(req, replicas, cfg, taus, bonuses, probe, models)
    ok = sorted((e for e in evals if e[1]), key=_neg_score)
    excluded = [e for e in evals if not e[1]]
    probing = req.spec_requested is None and probe
    choices = []
    for i, e in enumerate(ok):
        reason = _reason(e, ok[1:], excluded) if i == 0 else "spill"
        if e[7]:  # steered off
            reason += "+spec-off"
        elif probing and e[6].enabled:
            reason += "+spec-probe"
        choices.append(Choice(e[0].replica_id, e[2], reason, e[6], e[5],
                              {"score_no_affinity": e[3], "score_no_explore": e[4]}))
    return choices


def _neg_score(e: _Eval) -> float:
    return -e[2]


def _reason(best: _Eval, others: list[_Eval], excluded: list[_Eval]) -> str:
    score = best[2]
    if any(x[2] > score for x in excluded):
        return "headroom"  # a replica that would have won has no room for this request
    if not others:
        return "headroom" if excluded else "only"
    runner = max(others, key=lambda o: o[2])
    if best[8] and best[3] <= runner[2]:  # cached, and the score without affinity does not win
        return "affinity"
    if best[4] <= max(o[4] for o in others):  # the score without exploration does not win
        return "explore"
    if best[5] > runner[5] * 1.02:
        return "acceptance"
    return "load"
