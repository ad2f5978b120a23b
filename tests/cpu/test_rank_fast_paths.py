"""rank()'s shortcuts give the results of the full computation: the AR bound (``_Model.tau_ar``: a tau at which no
block can beat AR is settled without solving alpha) against the exact comparison at every tau, including the
corners where the bound is tight or void (tau below 1, speculative steps cheaper than AR, margins below 1)."""
from __future__ import annotations

import math
import random

import pytest

from orchestrator.routing import score
from orchestrator.routing.score import RouteRequest, RouterWeights, SpecParams, rank
from orchestrator.routing.stats import RoutingStats


def _fleet(rng: random.Random) -> list[RoutingStats]:
    out = []
    for i in range(rng.randint(1, 5)):
        ar = rng.uniform(5.0, 40.0)
        lo = rng.choice([0.3, 0.8, 1.0, 1.2])  # speculative steps down to 0.3x an AR step
        table = {"ar_ms": {"1": ar, "16": ar * rng.uniform(1.0, 3.0)},
                 "spec_ms": {k: {"1": ar * rng.uniform(lo, 2.0), "16": ar * rng.uniform(lo, 8.0)}
                             for k in rng.sample(["4", "8", "16"], rng.randint(1, 3))}}
        tau = rng.choice([0.6, 0.95, 1.0, 1.02, rng.uniform(1.0, 3.0), rng.uniform(1.0, 16.0), 16.0])
        out.append(RoutingStats(f"r{i}", kv_free_tokens=50_000, kv_total_tokens=60_000, num_running=rng.randint(0, 16),
                                step_costs=rng.choice([table, None]), step_ms_ar=rng.choice([None, ar]),
                                step_ms_by_block=rng.choice([{}, {16: ar * rng.uniform(lo, 3.0)}]),
                                tau_by_session={"s": (tau, rng.choice([0, 3, 500]))},
                                tau_mean=rng.choice([None, tau, rng.uniform(0.5, 4.0)]),
                                block_size_default=rng.choice([16, 8, 4]),
                                # decode EWMAs: steps priced by rows, the block chosen net of the others' loss;
                                # also rows below 1 (not read), tokens far beyond the rows (bounded by them),
                                # an idle replica (step_batch 0) and none given (num_running)
                                **rng.choice([{}, {"decode_ms": ar * rng.uniform(0.5, 4.0),
                                                   "decode_rows": rng.choice([rng.uniform(1.0, 200.0),
                                                                              rng.uniform(0.0, 1.0)]),
                                                   "decode_tokens": rng.choice([rng.uniform(0.0, 40.0),
                                                                                rng.uniform(0.0, 1e4)]),
                                                   "step_batch": rng.choice([rng.randint(0, 16), 0, None])}])))
        if rng.random() < 0.3:  # requests routed since the report, counted into the shared step: at the rows and
            # tokens decided for them (blocks, taus beyond the block and below 1), or without them (AR rows)
            n = rng.randint(1, 4)
            shares = [score.step_share(SpecParams(enabled=rng.random() < 0.6, block_size=rng.choice([2, 4, 8, 16])),
                                       rng.choice([rng.uniform(0.5, 17.0), 1.0])) for _ in range(n)]
            decided = rng.random() < 0.7
            out[-1] = out[-1].with_inflight(n, 100, sum(r for r, _ in shares) if decided else None,
                                            sum(t for _, t in shares) if decided else None)
    return out


def _full(rank_args, monkeypatch) -> list:
    """rank() with the AR bound switched off: every mode by the exact comparison."""
    with monkeypatch.context() as mp:
        real = score._Model.__init__

        def no_bound(self, *a, **k):
            real(self, *a, **k)
            self.tau_ar = -math.inf

        mp.setattr(score._Model, "__init__", no_bound)
        score._STEP_MEMO.clear()
        try:
            return rank(*rank_args)
        finally:
            score._STEP_MEMO.clear()


def test_the_ar_bound_settles_only_what_the_exact_comparison_settles(monkeypatch):
    rng = random.Random(7)
    settled = 0
    for _ in range(1500):
        reps = _fleet(rng)
        cfg = RouterWeights(explore=rng.choice([0.0, 0.0, 0.3]), spec_margin=rng.choice([0.5, 0.9, 1.05, 1.3]),
                            congestion=rng.choice([1.0, 1.0, 0.0, 3.0]))  # the penalties' weight
        # the client's explicit choice (a block the model may not hold) and a probe take the exact path
        asked = rng.choice([None, None, None, SpecParams(enabled=True, block_size=rng.choice([2, 3, 16])),
                            SpecParams(enabled=False)])
        req = RouteRequest("s", None, None, prompt_tokens=100, max_tokens=rng.choice([1, 128]), spec_requested=asked,
                           spec_off_turns=rng.choice([0, 0, 0, 8]))
        score._STEP_MEMO.clear()
        fast = rank(req, reps, cfg)
        settled += sum(score._step_model(r, cfg, score._step_cfg_key(cfg)).tau_ar > 0 for r in reps)
        assert fast == _full((req, reps, cfg), monkeypatch)
    assert settled > 500  # the bound did settle modes in these cases (it is what is tested)


@pytest.mark.parametrize("tau", [0.6, 0.9, 1.0])
def test_a_tau_below_one_still_speculates_where_a_speculative_step_is_cheaper(tau, monkeypatch):
    """tau(b) is at least 1 (the verified token): with a speculative step cheaper than AR / margin, speculation
    wins whatever the tau, and the bound must not settle it as AR."""
    r = RoutingStats("x", kv_free_tokens=50_000, kv_total_tokens=60_000, tau_mean=tau,
                     step_costs={"ar_ms": {"1": 10.0}, "spec_ms": {"16": {"1": 8.0}}})
    cfg = RouterWeights(explore=0.0)
    score._STEP_MEMO.clear()
    best = rank(RouteRequest(), [r], cfg)[0]
    assert best.spec.enabled and best.spec.block_size == 16
    assert rank(RouteRequest(), [r], cfg) == _full((RouteRequest(), [r], cfg), monkeypatch)


def test_the_best_speculative_rate_never_falls_as_tau_grows():
    """What lets rank() take AR at tau0 from AR at tau0 + bonus without a second comparison: on random step models,
    at every pair of taus (also a few ulps and a grid cell apart), the best rate over the blocks is monotone."""
    rng = random.Random(11)
    cfg = RouterWeights(steer_spec=False)  # _best_mode then returns the best block whatever AR does
    key = score._step_cfg_key(cfg)
    req = RouteRequest()
    for _ in range(300):
        r = _fleet(rng)[0]
        m = score._step_model(r, cfg, key)
        taus = sorted(rng.uniform(0.8, r.block_size_default + 0.5) for _ in range(30))
        t = rng.uniform(1.0, r.block_size_default)
        taus += [t, math.nextafter(t, 99.0), t + 1e-12, t + 2e-12]
        taus.sort()
        modes = [score._best_mode(req, r, cfg, m, tau, False)[0] for tau in taus]
        rates = [mode[0] for mode in modes]
        assert all(a <= b for a, b in zip(rates, rates[1:])), (taus, rates)
        # where steps are priced by rows the block is chosen on its rate less the others' loss: that too never falls
        nets = [mode[0] - m.pen[mode[2]] for mode in modes]
        assert all(a <= b for a, b in zip(nets, nets[1:])), (taus, nets)
