"""The decode-step EWMAs a replica reports (decode_ms, decode_rows, decode_tokens; score.py, "Mixed steps") are read
robustly: a malformed value is dropped where a report is parsed, and values no engine reports, set directly (a
simulator's stats), leave the mixed-step pricing rather than raise inside a decision or give a score that is not a
number."""
from __future__ import annotations

import math

import pytest

from orchestrator.routing.score import RouteRequest, RouterWeights, mixed_step_times, rank
from orchestrator.routing.stats import ReportCache, RoutingStats

TABLE = {"ar_ms": {"1": 12.25, "4": 14.03, "16": 21.09},
         "spec_ms": {"4": {"1": 15.52, "4": 22.14, "16": 52.84},
                     "16": {"1": 20.80, "4": 49.47, "16": 146.66}}}


def _report(**decode) -> dict:
    st = RoutingStats("r0", kv_free_tokens=20_000, kv_total_tokens=21_840, num_running=4, step_batch=4,
                      step_costs=TABLE, tau_mean=2.0, decode_ms=14.0, decode_rows=4.0, decode_tokens=4.0)
    d = st.to_dict()
    d.update(decode)
    return d


def _decide(stats: RoutingStats) -> list:
    out = rank(RouteRequest(role="coder", max_tokens=128), [stats], RouterWeights(explore=0.0))
    assert out and all(math.isfinite(c.score) for c in out)
    return out


BAD = ["abc", None, [1.0], {"x": 1}, math.nan, math.inf, -math.inf, 10**400, "nan", "inf"]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("field", ["decode_ms", "decode_rows", "decode_tokens"])
def test_a_malformed_decode_value_is_dropped_where_a_report_is_parsed(field, bad):
    for parse in (RoutingStats.from_dict, RoutingStats.from_report):
        st = parse(_report(**{field: bad}))
        assert getattr(st, field) is None
        assert mixed_step_times(st, [4]) is None  # the other model prices it
        _decide(st)
    st = ReportCache().parsed("r0", _report(**{field: bad}))
    assert st is not None and getattr(st, field) is None
    _decide(st)


def test_a_well_formed_decode_value_is_read_as_a_float():
    st = RoutingStats.from_report(_report(decode_ms="14.5", decode_rows=4, decode_tokens=3))
    assert (st.decode_ms, st.decode_rows, st.decode_tokens) == (14.5, 4.0, 3.0)
    assert type(st.decode_rows) is float and mixed_step_times(st, [4]) is not None
    assert RoutingStats.from_dict(st.to_dict()).decode_tokens == 3.0


def _direct(**decode) -> RoutingStats:
    kw = {"decode_ms": 14.0, "decode_rows": 4.0, "decode_tokens": 4.0, **decode}
    return RoutingStats("r0", kv_free_tokens=20_000, kv_total_tokens=21_840, num_running=4, step_batch=4,
                        step_costs=TABLE, tau_mean=2.0, **kw)


@pytest.mark.parametrize("decode", [{"decode_ms": math.inf}, {"decode_ms": math.nan}, {"decode_rows": math.inf},
                                    {"decode_rows": math.nan}, {"decode_tokens": math.inf},
                                    {"decode_tokens": math.nan}, {"decode_tokens": -math.inf}], ids=repr)
def test_non_finite_values_set_directly_leave_the_mixed_step_pricing(decode):
    """decode_rows = inf made the AR step infinite (AR rate 0: ZeroDivisionError in rank); inf tokens made the
    running sequences' loss infinite (scores that are not a number)."""
    st = _direct(**decode)
    assert mixed_step_times(st, [4, 16]) is None
    _decide(st)


def test_step_times_that_overflow_leave_the_mixed_step_pricing():
    st = _direct(decode_rows=1e308)
    st.step_costs = {"ar_ms": {"1": 10.0}, "spec_ms": {"16": {"1": 20.0, "2": 100.0}}}  # 5 ms a row beyond 32 rows
    st.__post_init__()  # parse it
    assert mixed_step_times(st, [4, 16]) is None  # 1e308 rows: an infinite step, AR rate 0
    _decide(st)


def test_more_tokens_than_rows_are_bounded_by_the_rows():
    """A row commits at most one token (a block-b row verifies b positions and commits at most b), so no engine
    reports tokens beyond rows; such a report's running sequences are priced as committing one token a row."""
    st = _direct(decode_tokens=1e300)
    t_now, s_now, _, _ = mixed_step_times(st, [4])
    assert s_now == 4.0
    assert mixed_step_times(_direct(decode_tokens=4.0), [4])[1] == 4.0
    _decide(st)
