"""Discrete-event goodput simulator: replicas with continuous batching + speculative decoding, routed
by the same pure functions the server uses (orchestrator.routing.score.rank and the baselines).

Per replica: a KV pool reserved at admission (prompt + max_tokens, as the engine does; no room =
HTTP 429), `max_num_seqs` running slots, Serve's `max_ongoing_requests` cap (beyond it requests wait
in the router), and a step-cost model (benchmarks/stepmodel.py: fitted on this machine, or the
B300 roofline). Each step advances every running sequence: AR commits 1 token; a speculative
sequence at block B (cut at the tokens it has left before max_tokens, as the engine's scheduler does; cut to 1
it is an AR step) commits 1 + k tokens, k ~ consecutive acceptances with the per-position
acceptance alpha of (this replica's drafter, the agent's role), capped at B - 1. A step is one target forward
over every sequence's rows, as the engine runs it: its step model's decode_s over the blocks (pure steps at
their ar_s / spec_s, mixed ones by their rows; benchmarks/stepmodel.py), plus the prefill of new prompts. Replicas report
EWMA acceptance per session / role / team and step times through RoutingStats every
`stats_period_s`, which is what the router sees (plus its own in-flight corrections). Like the engine, it also
reports EWMAs over every decode step (no prefill in it), mixed or pure: ms, target rows (1 per AR sequence, the
block per speculative one) and committed tokens, through the engine's own StatsTracker (alpha 0.1), which the
router reads to price a request's block as the rows it adds to the shared step. A replica with
`calibrated` (the default, as served replicas calibrate at start-up) also reports the step-cost table a real
engine measures (workers/engine/calibrate.py: AR and blocks 4 / 8 / 16 at batches 1 / 4 / 16 on a 64-token
prompt), read off its step model, so the router scores it through the same measured-cost path.

Sessions are closed loops over the trace (benchmarks/workload.py): turn k+1 goes out think_s after
turn k's answer; its prompt is the session's growing context.
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from orchestrator.routing.baselines import hash_order
from orchestrator.routing.score import RouteRequest, RouterWeights, rank, step_share
from orchestrator.routing.stats import RoutingStats
from orchestrator.routing.step_costs import StepCostTable
from workers.engine.acceptance import AcceptEntry, observe, tau_at_ref
from workers.engine.calibrate import DEFAULT_BATCHES, DEFAULT_BLOCKS, StepCosts
from workers.engine.params import SpecParams
from workers.engine.stats import StatsTracker, pure_step

EWMA = 0.2


@dataclass
class ReplicaSpecSim:
    name: str
    step: object  # a StepModel: ar_s(batch, ctx), spec_s(batch, block, ctx), decode_s(blocks, ctx), prefill_s(tokens)
    kv_total_tokens: int
    alpha_by_role: dict[str, float] = field(default_factory=dict)  # per-position acceptance of its drafter
    alpha_default: float = 0.6
    block_size: int = 16
    spec_available: bool = True
    max_num_seqs: int = 16
    max_ongoing: int = 32
    calibrated: bool = True  # reports the step-cost table a calibrating engine measures (else EWMAs only)


CALIBRATION_CTX = 64  # tokens of context in the engine's calibration steps (its synthetic prompt)


def calibrated_costs(spec: ReplicaSpecSim) -> dict:
    """The table workers/engine/calibrate.py would measure on this replica: its step model at the calibration's
    batches (within max_num_seqs) and blocks (within the drafter's), in ms, JSON form."""
    batches = [b for b in DEFAULT_BATCHES if b <= spec.max_num_seqs]
    blocks = [k for k in DEFAULT_BLOCKS if 2 <= k <= spec.block_size] if spec.spec_available else []
    ctx = CALIBRATION_CTX
    return StepCosts(ar_ms={b: spec.step.ar_s(b, ctx) * 1000 for b in batches},
                     spec_ms={k: {b: spec.step.spec_s(b, k, ctx) * 1000 for b in batches} for k in blocks}).to_dict()


@dataclass
class Req:
    rid: int
    session: str
    team: str
    role: str
    turn: int
    prompt_tokens: int
    max_tokens: int
    answer_tokens: int  # tokens it will generate (<= max_tokens; EOS earlier when measured so)
    t_arrive: float
    replica: str | None = None
    spec: SpecParams | None = None
    generated: int = 0
    passes: int = 0
    spec_passes: int = 0
    spec_tokens: int = 0
    block_now: int = 1  # its block in the current decode step (the engine's decode_block; 1 = AR)
    t_first: float | None = None
    t_done: float | None = None
    status: int = 0  # 200 done, 429 no capacity
    reason: str = ""
    route_tau: float = 1.0  # the router's predicted tau at `spec` (Choice.tau_hat); 1 where it predicted none


class _Replica:
    def __init__(self, spec: ReplicaSpecSim):
        self.s = spec
        self.kv_used = 0
        self.running: list[Req] = []
        self.waiting: deque[Req] = deque()
        self.busy_until: float | None = None
        # acceptance as per-position counts per session / role / team, reported at the drafter's block (as the
        # engine does: workers/engine/acceptance.py), whatever block each pass ran at
        self.accept: dict[str, dict[str, AcceptEntry]] = {"session": {}, "role": {}, "team": {}}
        self.accept_all: AcceptEntry | None = None
        self.step_ms_ar: float | None = None
        self.step_ms_by_block: dict[int, float] = {}
        # decode-step EWMAs (ms, rows, committed tokens), kept by the engine's own tracker and alpha
        self.decode = StatsTracker(max_block=spec.block_size)
        self.snapshot: RoutingStats | None = None
        self.snapshot_t = -1.0
        self.kv_trace: list[tuple[float, float]] = []
        self.step_costs = StepCostTable.parse(calibrated_costs(spec)) if spec.calibrated else None

    @property
    def ongoing(self) -> int:
        return len(self.running) + len(self.waiting)

    def stats(self, now: float) -> RoutingStats:
        return RoutingStats(
            self.s.name, kv_free_tokens=self.s.kv_total_tokens - self.kv_used,
            kv_total_tokens=self.s.kv_total_tokens, num_running=len(self.running),
            num_waiting=len(self.waiting), max_num_seqs=self.s.max_num_seqs,
            step_ms_ar=self.step_ms_ar, step_ms_by_block=dict(self.step_ms_by_block),
            step_batch=len(self.running), step_costs=self.step_costs,
            decode_ms=self.decode.decode_ms, decode_rows=self.decode.decode_rows,
            decode_tokens=self.decode.decode_tokens,
            tau_by_session=self.taus("session"), tau_by_role=self.taus("role"), tau_by_team=self.taus("team"),
            tau_mean=tau_at_ref(self.accept_all, self.s.block_size) if self.accept_all else None,
            block_size_default=self.s.block_size, spec_available=self.s.spec_available,
            prefill_ms_per_token=self.s.step.prefill_s(1000) if hasattr(self.s.step, "prefill_s") else None,
            updated_at=now,
        )

    def taus(self, key: str) -> dict[str, tuple[float, int]]:
        """{value: (tau at the drafter's block, passes)} of one tag key."""
        return {v: (tau_at_ref(e, self.s.block_size), e[2]) for v, e in self.accept[key].items()}

    def record_pass(self, r: Req, proposed: int, accepted: int) -> None:
        """One speculative pass of ``r``: ``proposed`` drafts, the first ``accepted`` of them accepted."""
        self.accept_all = observe(self.accept_all, proposed, accepted, EWMA)
        for key, val in (("session", r.session), ("role", r.role), ("team", r.team)):
            self.accept[key][val] = observe(self.accept[key].get(val), proposed, accepted, EWMA)


@dataclass
class SimResult:
    router: str
    requests: list[Req]
    duration_s: float
    kv_trace: dict[str, list[tuple[float, float]]]
    tau_by_replica_role: dict[str, dict[str, float]]


class Simulator:
    def __init__(self, replicas: list[ReplicaSpecSim], router: str = "specfleet",
                 weights: RouterWeights | None = None, stats_period_s: float = 1.0, seed: int = 0,
                 spec_default: bool = True, overhead_s: float = 0.0):
        if router not in ("specfleet", "pow2", "consistent_hash"):
            raise ValueError(f"unknown router {router!r}")
        self.reps = [_Replica(s) for s in replicas]
        self.by_name = {r.s.name: r for r in self.reps}
        self.router = router
        self.weights = weights or RouterWeights()
        self.period = stats_period_s
        self.rng = random.Random(seed)
        self.spec_default = spec_default
        self.overhead_s = overhead_s  # client -> ingress -> replica latency added to every turn
        self.events: list[tuple[float, int, str, object]] = []
        self._n = 0
        self.clock = 0.0  # the time of the event being handled: events never go before it
        self.router_queue: deque[Req] = deque()
        # replica -> requests routed there: (t, kv need, rows, tokens per step: score.step_share of its decision)
        self.inflight: dict[str, list[tuple[float, int, int, float]]] = {r.s.name: [] for r in self.reps}

    # ---------------------------------------------------------------- events
    def _push(self, t: float, kind: str, obj: object) -> None:
        if not t >= self.clock:  # also NaN: an event in the past is a bookkeeping bug, never a result to report
            raise RuntimeError(f"simulator: {kind} event at t={t!r} before the clock ({self.clock!r})")
        self._n += 1
        heapq.heappush(self.events, (t, self._n, kind, obj))

    # ---------------------------------------------------------------- routing
    def _view(self, rep: _Replica, now: float) -> RoutingStats:
        if rep.snapshot is None or now - rep.snapshot_t >= self.period:
            rep.snapshot, rep.snapshot_t = rep.stats(now), now
        s = RoutingStats(**{**rep.snapshot.__dict__})
        mine = [e for e in self.inflight[rep.s.name] if e[0] >= rep.snapshot_t]
        s.add_inflight([e[1] for e in mine], [(e[2], e[3]) for e in mine])  # as the router: at the rows decided
        return s

    def _route(self, r: Req, now: float) -> _Replica | None | str:
        """A replica, None (all at max_ongoing: wait in the router) or "429"."""
        open_ = [x for x in self.reps if x.ongoing < x.s.max_ongoing]
        if self.router == "specfleet":
            req = RouteRequest(r.session, r.role, r.team, r.prompt_tokens, r.max_tokens)
            choices = rank(req, [self._view(x, now) for x in self.reps], self.weights)
            if not choices:
                return "429"
            ties = [c for c in choices if abs(c.score - choices[0].score) <= 1e-6 * max(1.0, abs(choices[0].score))]
            if len(ties) > 1:
                self.rng.shuffle(ties)
                choices = ties + choices[len(ties):]
            for c in choices:
                rep = self.by_name[c.replica_id]
                if rep.ongoing < rep.s.max_ongoing:
                    r.spec, r.reason, r.route_tau = c.spec, c.reason, c.tau_hat
                    return rep
            return None
        if not open_:
            return None
        if self.router == "pow2":
            pick = self.rng.sample(open_, k=min(2, len(open_)))
            rep = min(pick, key=lambda x: x.ongoing)
        else:
            order = hash_order(r.session, [x.s.name for x in self.reps])
            rep = next((self.by_name[n] for n in order if self.by_name[n].ongoing < self.by_name[n].s.max_ongoing))
        r.spec = SpecParams(enabled=self.spec_default and rep.s.spec_available, block_size=rep.s.block_size)
        r.reason = self.router
        return rep

    def _dispatch(self, r: Req, now: float) -> None:
        target = self._route(r, now)
        if target is None:
            self.router_queue.append(r)
            return
        if target == "429":
            r.status, r.t_done = 429, now
            self._finish_turn(r, now)
            return
        rep = target
        r.replica = rep.s.name
        need = r.prompt_tokens + r.max_tokens
        if rep.kv_used + need > rep.s.kv_total_tokens:  # the engine's admission: NoCapacity -> 429
            r.status, r.t_done = 429, now
            self._finish_turn(r, now)
            return
        rep.kv_used += need
        if r.spec is None or not rep.s.spec_available:
            r.spec = SpecParams(enabled=False, block_size=rep.s.block_size)
        self.inflight[rep.s.name].append((now, need, *step_share(r.spec, r.route_tau)))
        rep.waiting.append(r)
        self._kick(rep, now)

    # ---------------------------------------------------------------- replica steps
    def _kick(self, rep: _Replica, now: float) -> None:
        if rep.busy_until is None and (rep.running or rep.waiting):
            self._step(rep, now)

    def _step(self, rep: _Replica, now: float) -> None:
        new: list[Req] = []
        while rep.waiting and len(rep.running) < rep.s.max_num_seqs:
            x = rep.waiting.popleft()
            rep.running.append(x)
            new.append(x)
        decode = [x for x in rep.running if x not in new]
        ctx = int(sum(x.prompt_tokens + x.generated for x in rep.running) / max(1, len(rep.running)))
        for x in decode:  # the engine's scheduler: never draft past max_tokens; a block cut to 1 is an AR step
            x.block_now = max(1, min(x.spec.block_size, x.max_tokens - x.generated)) if x.spec.enabled else 1
        blocks = [x.block_now for x in decode]
        # one target forward over every row (workers/engine/step.py): priced by the step model as a whole step
        t = rep.s.step.decode_s(blocks, ctx) if decode else 0.0
        pure = pure_step(blocks)
        if pure is not None and not new:  # like the engine: pure steps only describe a step kind
            b = pure[1]
            if b <= 1:
                rep.step_ms_ar = _ew(rep.step_ms_ar, t * 1000)
            else:
                rep.step_ms_by_block[b] = _ew(rep.step_ms_by_block.get(b), t * 1000)
        if new:
            t += rep.s.step.prefill_s(sum(x.prompt_tokens for x in new))
        rep.busy_until = now + t
        self._push(now + t, "step_done", (rep, new, decode, t * 1000))

    def _step_done(self, rep: _Replica, new: list[Req], decode: list[Req], ms: float, now: float) -> None:
        rep.busy_until = None
        for x in new:  # prefill produced the first token
            x.generated, x.t_first, x.passes = 1, now, 1
        committed = 0
        for x in decode:
            alpha = rep.s.alpha_by_role.get(x.role, rep.s.alpha_default)
            k = 0
            if x.block_now > 1:
                while k < x.block_now - 1 and self.rng.random() < alpha:
                    k += 1
                rep.record_pass(x, x.block_now - 1, k)
                x.spec_passes += 1
                x.spec_tokens += 1 + k
            x.generated += 1 + k
            x.passes += 1
            committed += 1 + k
        if decode and not new:  # like the engine: every decode step, mixed or pure, none with a prefill in it;
            # rows as fed to the target (1 per AR sequence, the block per speculative one), tokens as verified
            rows = sum(x.block_now for x in decode)
            rep.decode.record_decode_step(ms, rows, committed)
        for x in list(rep.running):
            if x.generated >= x.answer_tokens:
                x.generated = x.answer_tokens
                x.t_done, x.status = now, 200
                rep.running.remove(x)
                rep.kv_used -= x.prompt_tokens + x.max_tokens
                self.inflight[rep.s.name] = [e for e in self.inflight[rep.s.name] if e[0] >= rep.snapshot_t]
                self._finish_turn(x, now)
        rep.kv_trace.append((now, rep.kv_used / rep.s.kv_total_tokens))
        while self.router_queue and any(r.ongoing < r.s.max_ongoing for r in self.reps):
            self._dispatch(self.router_queue.popleft(), now)
        self._kick(rep, now)

    # ---------------------------------------------------------------- sessions
    def _finish_turn(self, r: Req, now: float) -> None:
        self.done.append(r)
        sess = self.sessions[r.session]
        if r.status == 200:  # the next prompt = this prompt + this answer + the next user turn
            sess["context"] = r.prompt_tokens + r.answer_tokens
        nxt = r.turn + 1
        if r.status != 200 or nxt >= len(sess["turns"]):  # a refused turn ends the agent's session
            self.active -= 1
            self._start_sessions(now)
            return
        self._push(now + sess["turns"][nxt]["think_s"], "turn", (r.session, nxt))

    def _start_sessions(self, now: float) -> None:
        while self.pending and (self.concurrency is None or self.active < self.concurrency):
            sid, start = self.pending[0]
            if self.concurrency is None and start > now:
                self._push(start, "start", None)
                return
            self.pending.popleft()
            self.active += 1
            self._push(max(now, start if self.concurrency is None else now), "turn", (sid, 0))

    def _turn(self, sid: str, i: int, now: float) -> None:
        sess = self.sessions[sid]
        turn = sess["turns"][i]
        prompt = turn.get("prompt_tokens") or sess["context"] + turn["user_tokens"]  # measured when known
        self._rid += 1
        r = Req(self._rid, sid, sess["team"], sess["role"], i, prompt, turn["max_tokens"],
                turn["answer_tokens"], now)
        if self.overhead_s > 0:
            self._push(now + self.overhead_s, "dispatch", r)
        else:
            self._dispatch(r, now)

    def run(self, sessions: list[dict], concurrency: int | None = None, horizon_s: float = 1e9) -> SimResult:
        """sessions: [{"session_id", "team", "role", "start_s", "system_tokens",
        "turns": [{"user_tokens", "max_tokens", "answer_tokens", "think_s"}]}]"""
        self.sessions = {s["session_id"]: {**s, "context": s["system_tokens"]} for s in sessions}
        self.pending = deque(sorted(((s["session_id"], s["start_s"]) for s in sessions), key=lambda x: x[1]))
        self.concurrency, self.active, self.done, self._rid = concurrency, 0, [], 0
        self.clock = now = 0.0
        self._start_sessions(now)
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            if now > horizon_s:
                break
            self.clock = now
            # the clock passed by name: a payload that grew a field cannot slide into `now` (16:44 run, see
            # tests/cpu/test_sim_invariants.py)
            if kind == "step_done":
                self._step_done(*obj, now=now)
            elif kind == "turn":
                self._turn(*obj, now=now)
            elif kind == "dispatch":
                self._dispatch(obj, now=now)
            elif kind == "start":
                self._start_sessions(now=now)
        taus: dict[str, dict[str, float]] = {}
        for rep in self.reps:
            taus[rep.s.name] = {k: v[0] for k, v in rep.taus("role").items()}
        return SimResult(self.router, self.done, now, {r.s.name: r.kv_trace for r in self.reps}, taus)


def _ew(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


# ---------------------------------------------------------------- metrics
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[i]


def summarize(reqs: list, duration_s: float | None = None) -> dict:
    """Works for simulated Req objects and for measured records with the same attribute names."""
    ok = [r for r in reqs if r.status == 200]
    t0 = min((r.t_arrive for r in reqs), default=0.0)
    t1 = max((r.t_done for r in ok), default=t0)
    dur = duration_s if duration_s is not None else max(1e-9, t1 - t0)
    tokens = sum(r.generated for r in ok)
    ttft = [r.t_first - r.t_arrive for r in ok if r.t_first is not None]
    tpot = [(r.t_done - r.t_first) / (r.generated - 1) for r in ok if r.t_first is not None and r.generated > 1]
    roles: dict[str, list[float]] = {}
    for r in ok:
        if getattr(r, "spec_passes", 0):
            roles.setdefault(r.role, []).append(r.spec_tokens / r.spec_passes)
    return {
        "requests": len(reqs), "completed": len(ok), "rejected_429": sum(1 for r in reqs if r.status == 429),
        "errors": sum(1 for r in reqs if r.status not in (200, 429)), "tokens": tokens,
        "duration_s": round(dur, 3), "goodput_tps": round(tokens / dur, 3),
        "ttft_p50_s": round(pct(ttft, 50), 4), "ttft_p99_s": round(pct(ttft, 99), 4),
        "tpot_p50_ms": round(1000 * pct(tpot, 50), 3), "tpot_p99_ms": round(1000 * pct(tpot, 99), 3),
        "tau_by_role": {k: round(sum(v) / len(v), 3) for k, v in sorted(roles.items())},
    }


def sessions_from_trace(trace, chars_per_token: float = 4.0, answer_frac: float = 1.0,
                        per_message_tokens: int = 6, measured: dict | None = None) -> list[dict]:
    """Workload SessionTraces -> simulator sessions. Token counts: measured ones when given
    ({(session_id, turn): (prompt_tokens, completion_tokens)}, from a real run), else
    len(text)/chars_per_token (+ chat-template overhead per message) and answer = max_tokens*answer_frac."""
    out = []
    for s in trace:
        turns = []
        for i, t in enumerate(s.turns):
            user = per_message_tokens + math.ceil(len(t.user) / chars_per_token)
            ans, prompt = max(1, int(t.max_tokens * answer_frac)), None
            if measured and (s.session_id, i) in measured:
                prompt, ans = measured[(s.session_id, i)]
            turns.append({"user_tokens": user, "max_tokens": t.max_tokens, "answer_tokens": max(1, ans),
                          "think_s": t.think_s, "prompt_tokens": prompt})
        out.append({"session_id": s.session_id, "team": s.team, "role": s.role, "start_s": s.start_s,
                    "system_tokens": per_message_tokens + math.ceil(len(s.system) / chars_per_token),
                    "turns": turns})
    return out
