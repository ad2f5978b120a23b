"""Pure, torch-free replica scoring: where does this request run fastest without running out of KV?

``rank(request, replicas, cfg)`` returns one ``Choice`` per eligible replica, best first. The score is
the request's expected goodput in tokens/s on that replica:

    rate      = tau_hat(B) / t_step(batch+1, B)          (speculative, block B)  or  1 / t_ar(batch+1)
    T         = queue_wait + prefill(uncached prompt) + max_tokens / rate
    score     = (max_tokens / T  -  slowdown imposed on the replica's running requests) x kv_pressure

tau_hat: the session's measured acceptance on that replica, shrunk towards its role prior, team prior and
the replica mean (each worth ``prior_strength`` steps), plus a UCB exploration bonus for few samples.
Acceptance is modelled as i.i.d. per position (alpha) so a tau measured at the drafter's block size
predicts tau at a smaller block; speculation is steered per request: the block maximising
tau(B)/t_spec(B) is used when it beats 1/t_ar by ``spec_margin``, else ``SpecParams(enabled=False)``.
Replicas whose free KV < (uncached prompt + max_tokens + block) x kv_safety are excluded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.routing.stats import RoutingStats
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
    batch_slope: float = Field(0.03, ge=0, description="relative step-time growth per extra sequence")
    spec_cost_ratio: float = Field(1.5, ge=1.0, description="spec step / AR step at block 16, unmeasured")


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
    if b == b0 or b0 < 2:
        return max(1.0, min(tau0, float(b)))
    alpha = alpha_from_tau(tau0, b0)
    if alpha >= 1.0:
        return float(b)
    return (1.0 - alpha**b) / (1.0 - alpha)


def alpha_from_tau(tau: float, b: int) -> float:
    """Per-position acceptance alpha with sum_{k<b} alpha^k = tau (bisection; tau clamped to [1, b])."""
    tau = max(1.0, min(float(tau), float(b)))
    if tau >= b - 1e-9:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        val = (1.0 - mid**b) / (1.0 - mid)
        lo, hi = (mid, hi) if val < tau else (lo, mid)
    return 0.5 * (lo + hi)


def _shrink(x: tuple[float, int] | None, prior: float, k: float) -> tuple[float, int]:
    if not x or x[1] <= 0:
        return prior, 0
    tau, n = x
    return (n * tau + k * prior) / (n + k), n


def estimate_tau(req: RouteRequest, r: RoutingStats, cfg: RouterWeights) -> tuple[float, int]:
    """(tau_hat at r.block_size_default, samples behind the most specific estimate)."""
    k = cfg.prior_strength
    est = r.tau_mean if r.tau_mean is not None else cfg.tau_default
    n = 0
    if req.team:
        est, n = _shrink(r.tau_by_team.get(req.team), est, k)
    if req.role:
        est, n_role = _shrink(r.tau_by_role.get(req.role), est, k)
        n = n_role or n
    if req.session_id:
        est, n_sess = _shrink(r.tau_by_session.get(req.session_id), est, k)
        n = n_sess or n
    return est, n


# ------------------------------------------------------------------ step-time model
def _step_times(r: RoutingStats, cfg: RouterWeights, batch: int, blocks: list[int]):
    """(t_ar(batch) ms, {block: t_spec(batch, block) ms}) for a replica with `batch` running sequences."""
    if r.step_base_ms is not None and r.step_per_token_ms is not None:
        base, per = r.step_base_ms, r.step_per_token_ms
        draft = r.draft_ms or 0.0
        return base + per * batch, {b: base + per * batch * b + draft for b in blocks}
    b0 = max(r.num_running, 1)
    scale = max(0.1, 1.0 + cfg.batch_slope * (batch - b0))
    t_ar = (r.step_ms_ar if r.step_ms_ar else cfg.default_step_ms) * scale
    measured = {b: t * scale for b, t in r.step_ms_by_block.items() if t > 0}
    out = {}
    for b in blocks:
        if b in measured:
            out[b] = measured[b]
        elif measured:  # linear in tokens per pass through the nearest measured block
            bm = min(measured, key=lambda m: abs(m - b))
            out[b] = t_ar + (measured[bm] - t_ar) * b / bm
        else:
            out[b] = t_ar * (1.0 + (cfg.spec_cost_ratio - 1.0) * b / 16.0)
    return t_ar, out


def _blocks(r: RoutingStats, cfg: RouterWeights) -> list[int]:
    top = r.block_size_default
    if not cfg.steer_block:
        return [top]
    cands = set(cfg.block_sizes) or (set(r.step_ms_by_block) | {top})
    return sorted(b for b in cands if 2 <= b <= top) or [top]


# ------------------------------------------------------------------ one replica
@dataclass
class _Eval:
    r: RoutingStats
    eligible: bool
    score: float
    score_no_affinity: float
    score_no_explore: float
    tau_hat: float
    spec: SpecParams
    steered_off: bool
    cached: bool


def _evaluate(req: RouteRequest, r: RoutingStats, cfg: RouterWeights, bonus: float) -> _Eval:
    cached = bool(req.session_id) and req.session_id in r.cached_sessions
    prefix = min(req.prefix_tokens, req.prompt_tokens) if cached else 0
    block_max = r.block_size_default if r.spec_available else 1
    new_kv = (req.prompt_tokens - prefix) + req.max_tokens + block_max
    eligible = r.kv_free_tokens >= new_kv * cfg.kv_safety
    if r.vram_free_bytes is not None and r.vram_free_bytes < cfg.min_vram_free_bytes:
        eligible = False

    batch = r.num_running + 1
    blocks = _blocks(r, cfg)
    t_ar, t_spec = _step_times(r, cfg, batch, blocks)
    t_ar_now, t_spec_now = _step_times(r, cfg, max(r.num_running, 1), blocks)
    tau0, _ = estimate_tau(req, r, cfg)

    def best_mode(tau_base: float) -> tuple[float, float, int | None]:
        """(rate tokens/ms, tau, block or None for AR)."""
        rate, tau, blk = 1.0 / t_ar, 1.0, None
        if not r.spec_available:
            return rate, tau, blk
        req_spec = req.spec_requested
        if req_spec is not None:  # the client decided; respect it (clamped to the drafter)
            if not req_spec.enabled:
                return rate, tau, blk
            b = min(req_spec.block_size, r.block_size_default)
            tb = tau_at_block(tau_base, r.block_size_default, b)
            _, ts = _step_times(r, cfg, batch, [b])
            return tb / ts[b], tb, b
        best = None
        for b in blocks:
            tb = tau_at_block(tau_base, r.block_size_default, b)
            cand = (tb / t_spec[b], tb, b)
            best = cand if best is None or cand[0] > best[0] else best
        probe = cfg.spec_probe_every > 0 and req.spec_off_turns >= cfg.spec_probe_every
        if not cfg.steer_spec or probe or best[0] > rate * cfg.spec_margin:
            return best
        return rate, tau, blk

    def score_with(tau_base: float, saved_prefix: float) -> tuple[float, float, int | None]:
        rate, tau, blk = best_mode(tau_base)
        t_step = tau / rate  # ms per target pass (rate = tau / t_step)
        p_ms = r.prefill_ms_per_token if r.prefill_ms_per_token is not None else cfg.default_prefill_ms_per_token
        prefill_ms = max(0.0, req.prompt_tokens - cfg.affinity * saved_prefix) * p_ms
        ahead = r.num_waiting + max(0, r.num_running + 1 - r.max_num_seqs)
        queue_ms = ahead * (req.max_tokens / rate) / max(r.max_num_seqs, 1)
        total_ms = cfg.queue * queue_ms + prefill_ms + req.max_tokens / rate
        own = req.max_tokens / total_ms * 1000.0  # tokens/s
        # slowdown of the replica's running requests when this one joins the batch
        t_now = t_spec_now.get(blk, t_ar_now) if blk else t_ar_now
        tau_others = r.tau_mean if (r.tau_mean and blk) else 1.0
        loss = r.num_running * tau_others * (1000.0 / t_now - 1000.0 / t_step) if t_step > t_now else 0.0
        kv_after = 1.0 - (r.kv_free_tokens - new_kv) / r.kv_total_tokens if r.kv_total_tokens > 0 else 1.0
        damp = 1.0
        if kv_after > cfg.kv_watermark:
            over = min(1.0, (kv_after - cfg.kv_watermark) / (1.0 - cfg.kv_watermark))
            damp = 1.0 - cfg.kv_pressure * over
        return (own - cfg.congestion * loss) * damp, tau, blk

    s, tau, blk = score_with(tau0 + bonus, prefix)
    s_no_aff, _, _ = score_with(tau0 + bonus, 0.0)
    s_no_exp, _, _ = score_with(tau0, prefix)
    if blk is None:
        spec = SpecParams(enabled=False, block_size=r.block_size_default)
    else:
        spec = SpecParams(enabled=True, block_size=blk)
        tau = tau_at_block(tau0, r.block_size_default, blk)  # report the estimate, not the optimism
    steered_off = r.spec_available and blk is None and req.spec_requested is None
    return _Eval(r, eligible, s, s_no_aff, s_no_exp, tau, spec, steered_off, cached)


# ------------------------------------------------------------------ ranking
def _bonuses(req: RouteRequest, replicas: list[RoutingStats], cfg: RouterWeights) -> list[float]:
    ns = [estimate_tau(req, r, cfg)[1] if r.spec_available else 0 for r in replicas]
    total = sum(ns)
    return [
        cfg.explore * math.sqrt(math.log(2.0 + total) / (1.0 + n)) if r.spec_available else 0.0
        for n, r in zip(ns, replicas)
    ]


def rank(req: RouteRequest, replicas: list[RoutingStats], cfg: RouterWeights | None = None) -> list[Choice]:
    """Eligible replicas, best first, each with its predicted goodput, reason and speculation choice."""
    cfg = cfg or RouterWeights()
    if not replicas:
        return []
    evals = [_evaluate(req, r, cfg, b) for r, b in zip(replicas, _bonuses(req, replicas, cfg))]
    ok = sorted((e for e in evals if e.eligible), key=lambda e: -e.score)
    excluded = [e for e in evals if not e.eligible]
    choices = []
    for i, e in enumerate(ok):
        others = [o for o in ok if o is not e]
        reason = _reason(e, others, excluded) if i == 0 else "spill"
        if e.steered_off:
            reason += "+spec-off"
        elif e.spec.enabled and req.spec_requested is None and cfg.spec_probe_every > 0 \
                and req.spec_off_turns >= cfg.spec_probe_every:
            reason += "+spec-probe"
        choices.append(
            Choice(
                e.r.replica_id, e.score, reason, e.spec, e.tau_hat,
                {"score_no_affinity": e.score_no_affinity, "score_no_explore": e.score_no_explore},
            )
        )
    return choices


def _reason(best: _Eval, others: list[_Eval], excluded: list[_Eval]) -> str:
    if any(x.score > best.score for x in excluded):
        return "headroom"  # a replica that would have won has no room for this request
    if not others:
        return "headroom" if excluded else "only"
    runner = max(others, key=lambda o: o.score)
    if best.cached and best.score_no_affinity <= runner.score:
        return "affinity"
    if best.score_no_explore <= max(o.score_no_explore for o in others):
        return "explore"
    if best.tau_hat > runner.tau_hat * 1.02:
        return "acceptance"
    return "load"
