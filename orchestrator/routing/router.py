"""Ray Serve request router that places each request by predicted goodput (orchestrator.routing.score).

Contract with the ingress and the replica deployment (orchestrator/routing/decisions.py, docs/routing.md):

* The ingress calls the replica deployment with a ``route=`` keyword argument built by
  ``route_hints(...)`` through ``handle.options(session_id=sid)``.
* ``SpecfleetRouter`` (one instance per caller process, i.e. in the ingress) ranks the replicas
  with ``score.rank`` on the routing stats each replica reports (``record_routing_stats`` returns
  ``RoutingStats.to_dict()``), corrected for requests it sent since those stats were measured.
  It returns singleton ranks, best first, so Serve spills to the next replica only when the best
  one is at ``max_ongoing_requests``.
* Its ``RouteDecision`` (best replica, reason, SpecParams, prediction, and the SpecParams chosen for
  every other ranked replica) travels in the call's kwargs as ``route["decision"]`` (Serve sends
  ``pending_request.kwargs`` after ``choose_replicas`` returns; verified by tests/cpu/test_router.py);
  the replica lands it (``decisions.land``) and reports it back in its first stream item.
* Per decision the router does O(replicas) small constant work: each replica's report is parsed once
  (``stats.ReportCache``; Serve hands over new dicts for every replica whenever one reports), the requests
  sent since a report are kept as running sums (``InFlight``), and ``rank`` looks sessions up in dicts and
  sets. ``benchmarks/router_cost.py`` measures it (docs/routing.md, "Decision cost").
* When no replica has KV headroom the request goes to the replica with the most free KV with
  reason ``no-headroom``; the engine's admission then raises NoCapacity (HTTP 429), never OOM.
"""
from __future__ import annotations

import random
import time
from typing import Any

from orchestrator import fleet as _fleet
from orchestrator.routing import decisions as _dec
from orchestrator.routing.score import RouterWeights, prepare, rank, step_share
from orchestrator.routing.stats import ReportCache, RoutingStats

try:  # keep the module importable where Serve is absent
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError:  # pragma: no cover
    RequestRouter = object  # type: ignore[misc,assignment]
    PendingRequest = RunningReplica = Any  # type: ignore[misc,assignment]


class InFlight:
    """Requests a router sent and has not seen complete, per replica:
    {replica: {request: (t_sent, kv, rows, tokens)}} (rows, tokens: what the request adds to the replica's step
    per the router's decision, ``score.step_share``; 1 and 1.0 where none was recorded).

    ``unseen(replica, since, now)`` is what that replica's stats cannot show yet: how many of its requests
    were sent at or after ``since`` (its report's updated_at less a grace) and the KV they need
    (``unseen_steps``: and their rows and tokens per step); entries
    older than ``ttl_s`` are dropped (a completion that never came). Kept as running sums per replica: O(1)
    per request and per decision; a replica's entries are scanned again only when ``since`` moves (a new
    report) or its oldest counted entry expires."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self._by_replica: dict[str, dict[str, tuple[float, int, int, float]]] = {}
        self._where: dict[str, str] = {}  # request -> replica
        # replica -> [since, count, kv, oldest counted t_sent or None, rows, tokens] (tokens on step_share's grid:
        # the sums are exact, whatever the order requests come and go in)
        self._sums: dict[str, list] = {}

    def add(self, replica: str, request: str, t: float, need: int, rows: int = 1, tokens: float = 1.0) -> None:
        self.take(request)
        self._by_replica.setdefault(replica, {})[request] = (t, need, rows, tokens)
        self._where[request] = replica
        agg = self._sums.get(replica)
        if agg is not None and t >= agg[0]:
            agg[1] += 1
            agg[2] += need
            agg[3] = t if agg[3] is None else min(agg[3], t)
            agg[4] += rows
            agg[5] += tokens

    def where(self, request: str) -> str | None:
        """The replica the request is counted on, None where it is not."""
        return self._where.get(request)

    def pop(self, request: str, replica: str | None = None) -> tuple[float, int] | None:
        """Forget a request (only if it is on ``replica``, when given); its (t_sent, kv) or None."""
        entry = self.take(request, replica)
        return entry[:2] if entry is not None else None

    def take(self, request: str, replica: str | None = None) -> tuple[float, int, int, float] | None:
        """``pop``, returning the whole entry: (t_sent, kv, rows, tokens) or None."""
        where = self._where.get(request)
        if where is None or (replica is not None and where != replica):
            return None
        del self._where[request]
        entry = self._by_replica[where].pop(request)
        agg = self._sums.get(where)
        if agg is not None and entry[0] >= agg[0]:
            agg[1] -= 1
            agg[2] -= entry[1]
            agg[4] -= entry[2]
            agg[5] -= entry[3]
        return entry

    def unseen(self, replica: str, since: float, now: float) -> tuple[int, int]:
        """(count, kv) of the replica's requests sent at or after ``since``."""
        return self.unseen_steps(replica, since, now)[:2]

    def unseen_steps(self, replica: str, since: float, now: float) -> tuple[int, int, int, float]:
        """(count, kv, rows, tokens per step) of the replica's requests sent at or after ``since``."""
        agg = self._sums.get(replica)
        if agg is None or agg[0] != since or (agg[3] is not None and agg[3] < now - self.ttl_s):
            agg = self._rescan(replica, since, now)
        return agg[1], agg[2], agg[4], agg[5]

    def _rescan(self, replica: str, since: float, now: float) -> list:
        mine = self._by_replica.get(replica, {})
        for iid in [i for i, e in mine.items() if e[0] < now - self.ttl_s]:
            del mine[iid]
            del self._where[iid]
        counted = [e for e in mine.values() if e[0] >= since]
        agg = [since, len(counted), sum(e[1] for e in counted), min((e[0] for e in counted), default=None),
               sum(e[2] for e in counted), sum(e[3] for e in counted)]
        self._sums[replica] = agg
        return agg

    def __len__(self) -> int:
        return len(self._where)


class SpecfleetRouter(RequestRouter):
    """Goodput router: measured acceptance per session/role/team, KV headroom, affinity, exploration."""

    def initialize_state(
        self, weights: dict[str, Any] | None = None, seed: int | None = None, stats_grace_s: float = 0.5, **_: Any
    ):
        self._weights = RouterWeights(**(weights or {}))
        self._rng = random.Random(seed)
        self._reports = ReportCache()  # each replica's report, parsed once
        self._models: dict[str, tuple[RoutingStats, Any]] = {}  # replica id -> (its view, score.prepare of it)
        self._inflight = InFlight()  # requests sent since each replica's last stats
        self._grace_s = float(stats_grace_s)  # a request sent this long before a stats sample may
        # not be admitted yet when the replica measured: keep counting it (conservative)
        _fleet.ROUTERS.attach(self)  # the ingress reads the replica set (node, capacity) from here

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's hook for a new replica set, called whenever any replica reports (its long poll hands over the
        whole set, each replica with its latest routing stats): the reports are parsed here, as they arrive, so a
        decision finds them parsed (``take_reports``)."""
        up = getattr(super(), "update_replicas", None)
        if up is not None:
            up(replicas)
        self.take_reports(replicas)

    def take_reports(self, replicas: list[Any]) -> None:
        """Parse the replicas' reports that are new (``ReportCache``: a report already parsed costs a lookup), and
        for each new one do now what the next decision would do first: count the requests sent since it (a new
        report moves that cut-off: a rescan) and build its step model (``score.prepare``)."""
        if not hasattr(self, "_reports"):
            self.initialize_state()
        reports, fresh = self._reports, []
        for r in replicas:
            rid = r.replica_id.unique_id
            before = reports.known(rid)
            _dec.stats_of(r, reports)
            after = reports.known(rid)
            if after is not None and after is not before:
                fresh.append(r)
        if fresh:
            self._corrected(fresh, time.time())  # builds their views' step models

    def _corrected(self, replicas: list[Any], now: float) -> tuple[list[RoutingStats], list]:
        """Each replica's last report (parsed once) with the requests sent since counted in, and its step model
        (``score.prepare``), kept per view: a view is never changed, and most replicas' views do not change between
        two decisions, so most models are reused without building the step memo's key."""
        reports, unseen, grace, stats_of = self._reports, self._inflight.unseen_steps, self._grace_s, _dec.stats_of
        with_inflight, models, weights = reports.with_inflight, self._models, self._weights
        out, ms = [], []
        for r in replicas:
            s = stats_of(r, reports)
            rid = s.replica_id
            n, kv, rows, tokens = unseen(rid, s.updated_at - grace, now)
            if n > 0:
                s = with_inflight(s, n, kv, rows, tokens)
            hit = models.get(rid)
            if hit is not None and hit[0] is s:
                m = hit[1]
            else:
                m = prepare([s], weights)[0]
                models[rid] = (s, m)
            out.append(s)
            ms.append(m)
        return out, ms

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # never spin the caller's loop
        if not candidate_replicas:
            return []
        if not hasattr(self, "_weights"):
            self.initialize_state()
        hints = (pending_request.kwargs.get(_dec.ROUTE_KWARG) if pending_request is not None else None) or {}
        if pending_request is not None and not hints and pending_request.metadata.session_id:
            hints = {"session_id": pending_request.metadata.session_id}
        if len(self._reports) > 2 * len(candidate_replicas) + 8:
            keep = {r.replica_id.unique_id for r in candidate_replicas}
            self._reports.keep(keep)
            for rid in [rid for rid in self._models if rid not in keep]:
                del self._models[rid]
        candidate_replicas = _dec.without_avoided(candidate_replicas, hints)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        req = _dec.route_request_from_hints(hints)
        now = time.time()
        stats, models = self._corrected(candidate_replicas, now)
        choices = _dec.order_with_shuffled_ties(rank(req, stats, self._weights, models), self._rng)
        if choices:
            ordered = [c.replica_id for c in choices]
        else:  # nobody has headroom: most free KV first, the engine's admission answers 429
            ordered = [s.replica_id for s in sorted(stats, key=lambda s: -s.kv_free_tokens)]
        decision = _dec.RouteDecision.from_choices(choices, ordered)
        if pending_request is not None:
            # count it on the best replica now: concurrent requests routed before this one is sent
            # must see it (on_request_routed moves it to the replica Serve actually used)
            need = req.prompt_tokens + req.max_tokens
            iid = pending_request.metadata.internal_request_id
            self._inflight.pop(iid)
            if choices:  # with the rows and tokens per step it adds there (the block and tau_hat decided)
                rows, tokens = step_share(choices[0].spec, choices[0].tau_hat)
                self._inflight.add(ordered[0], iid, time.time(), need, rows, tokens)
            if _dec.ROUTE_KWARG in pending_request.kwargs:
                pending_request.kwargs[_dec.ROUTE_KWARG] = _dec.with_decision(hints, decision)
        return [[by_id[rid]] for rid in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        uid = replica_id.unique_id
        iid = pending_request.metadata.internal_request_id
        was = self._inflight.where(iid)
        prev = self._inflight.take(iid)
        need = prev[1] if prev else 0
        route0 = pending_request.kwargs.get(_dec.ROUTE_KWARG) or {}
        if not need:
            need = int(route0.get("prompt_tokens") or 0) + int(route0.get("max_tokens") or 0)
        if prev is not None and was == uid:  # where the router put it: the block and tau_hat it decided there
            rows, tokens = prev[2], prev[3]
        else:  # a spill: the block decided for that replica (its tau_hat is not in the decision: 1 token a step)
            rows, tokens = _spilled_rows(route0, uid), 1.0
        self._inflight.add(uid, iid, time.time(), need, rows, tokens)
        _dec.record_dispatch(pending_request, replica_id)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._inflight.pop(internal_request_id, replica_id.unique_id)


def _spilled_rows(route: Any, replica_id: str) -> int:
    """Target rows a request adds on ``replica_id`` per the decision in its ``route`` kwarg (the block of the spec
    decided for that replica, 1 for AR); 1 where the decision names none or is malformed."""
    try:
        spec = route["decision"]["alternatives"][replica_id][0]
        if spec and spec.get("enabled"):
            b = int(spec.get("block_size") or 1)
            return b if b >= 1 else 1
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        pass
    return 1
