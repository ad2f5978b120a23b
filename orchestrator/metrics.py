"""Prometheus metrics of the ingress (served at /metrics).

Per replica, from what each stream reports: accepted length per target pass (histogram), tokens,
decode speed, KV and VRAM headroom, queue depth; per route reason: decisions; per endpoint: requests
by HTTP status (every response) and latency; turns by outcome. From the fleet view at every scrape: replicas,
nodes, and per replica its engine's start-up CPU-kernel self-check, its decode-step EWMAs and its start-up step-cost
table. A private registry per server keeps tests independent.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACCEPT_BUCKETS = tuple(float(b) for b in range(1, 17)) + (24.0, 32.0, 64.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.accepted_length = Histogram(
            "specfleet_accepted_length", "Tokens committed per target pass", ["replica"], buckets=ACCEPT_BUCKETS,
            registry=r)
        self.tokens = Counter("specfleet_generated_tokens", "Completion tokens generated", ["replica"], registry=r)
        self.decode_tps = Histogram(
            "specfleet_request_tokens_per_second", "Per-request decode speed (completion tokens / s after the "
            "first token)", ["replica"], buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000), registry=r)
        self.tokens_per_s = Gauge("specfleet_replica_tokens_per_second",
                                  "Decode speed of the last finished request", ["replica"], registry=r)
        self.kv_free = Gauge("specfleet_kv_free_tokens", "Free KV-cache tokens", ["replica"], registry=r)
        self.kv_total = Gauge("specfleet_kv_total_tokens", "KV-cache capacity in tokens", ["replica"], registry=r)
        self.vram_free = Gauge("specfleet_vram_free_bytes", "Free GPU memory", ["replica"], registry=r)
        self.replica_running = Gauge("specfleet_replica_running", "Requests running in the engine", ["replica"],
                                     registry=r)
        self.replica_waiting = Gauge("specfleet_replica_waiting", "Requests queued in the engine", ["replica"],
                                     registry=r)
        self.queue_depth = Gauge("specfleet_ingress_queue_depth", "Requests waiting for a per-key slot", registry=r)
        self.in_flight = Gauge("specfleet_ingress_in_flight", "Requests being served by the ingress", registry=r)
        self.routes = Counter("specfleet_route_decisions", "Routing decisions", ["replica", "reason"], registry=r)
        self.spec_decisions = Counter("specfleet_spec_decisions", "Speculation decisions (block size or off)",
                                      ["decision"], registry=r)
        self.requests = Counter("specfleet_requests", "HTTP responses by endpoint and HTTP status code, whatever "
                                "answered (validation 400, auth 401, body limit 413, admission 429, 5xx)",
                                ["endpoint", "status"], registry=r)
        self.turns = Counter("specfleet_turns", "Admitted generation turns by outcome (ok, error: the replica "
                             "failed, aborted: the client went away)", ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("specfleet_request_latency_seconds", "End-to-end request latency", ["endpoint"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        # the fleet as the ingress sees it (orchestrator/fleet.py), refreshed at every scrape
        self.fleet_replicas = Gauge("specfleet_fleet_replicas", "Model replicas by state (expected = configured, "
                                    "live = routed to, suspect = failed just now)", ["state"], registry=r)
        self.fleet_capacity = Gauge("specfleet_fleet_capacity_requests", "Requests the live replicas can hold "
                                    "(sum of max_ongoing_requests); admission refuses beyond it", registry=r)
        self.fleet_nodes = Gauge("specfleet_fleet_nodes", "Nodes by state (live = hosts live replicas, lost = "
                                 "hosted replicas that are gone)", ["state"], registry=r)
        self.node_replicas = Gauge("specfleet_node_replicas", "Live replicas on the node", ["node"], registry=r)
        self.node_gpus = Gauge("specfleet_node_gpus", "GPUs of the node's replicas (NVML)", ["node"], registry=r)
        self.node_vram_free = Gauge("specfleet_node_vram_free_bytes", "Free memory of those GPUs (NVML)", ["node"],
                                    registry=r)
        self.node_vram_total = Gauge("specfleet_node_vram_total_bytes", "Memory of those GPUs (NVML)", ["node"],
                                     registry=r)
        self.node_running = Gauge("specfleet_node_running", "Requests running in the node's engines", ["node"],
                                  registry=r)
        self.node_kv_free = Gauge("specfleet_node_kv_free_tokens", "Free KV-cache tokens on the node", ["node"],
                                  registry=r)
        self.node_step_ms = Gauge("specfleet_node_step_ms", "Mean engine step time of the node's replicas "
                                  "(kind: ar, or block_N for a speculative step of block N)", ["node", "kind"],
                                  registry=r)
        self.node_lost = Gauge("specfleet_node_lost", "1 for a node whose replicas are gone", ["node"], registry=r)
        # per live replica, its engine's start-up CPU-kernel self-check (orchestrator/kernel_status.py)
        self.kernel_check = Gauge("specfleet_cpu_kernel_check", "1 for the result of the replica engine's start-up "
                                  "CPU-kernel self-check (passed, failed: kernels turned off, skipped, not_run)",
                                  ["replica", "check"], registry=r)
        self.kernels_enabled = Gauge("specfleet_cpu_kernels_enabled", "1 when the replica's engine serves through "
                                     "the CPU kernels, 0 when off (check: why); absent when not known (not run)",
                                     ["replica", "check"], registry=r)
        self.kernel_rel_err = Gauge("specfleet_cpu_kernel_check_rel_err", "Worst relative logits error, CPU "
                                    "kernels vs the torch path, in the replica's start-up self-check", ["replica"],
                                    registry=r)
        # per live replica, what its engine reports of its decode steps (the router prices blocks by rows from
        # these: orchestrator/routing/score.py, "Mixed steps"): EWMAs over every decode step, and the step-cost
        # table it measured at start-up (workers/engine/calibrate.py); benchmarks/router_compare.py saves them
        self.decode_step_ms = Gauge("specfleet_replica_decode_step_ms", "EWMA of the replica's decode step (every "
                                    "decode step, AR and speculative rows mixed; no prefill in it), ms",
                                    ["replica"], registry=r)
        self.decode_step_rows = Gauge("specfleet_replica_decode_step_rows", "EWMA of the target rows of a decode "
                                      "step (1 per AR sequence, the block per speculative one)", ["replica"],
                                      registry=r)
        self.decode_step_tokens = Gauge("specfleet_replica_decode_step_tokens", "EWMA of the tokens a decode step "
                                        "commits", ["replica"], registry=r)
        self.step_cost = Gauge("specfleet_replica_step_cost_ms", "The replica's start-up step-cost calibration: ms "
                               "of one decode step of `batch` sequences at `block` (1 = the AR step)",
                               ["replica", "block", "batch"], registry=r)
        self.refused = Counter("specfleet_admission_refused", "Requests refused by fleet admission "
                               "(fleet_capacity: 429, no_replica: 503)", ["reason"], registry=r)
        self.tool_calls = Counter("specfleet_tool_calls", "Tool calls returned to clients", registry=r)
        self.constrained_turns = Counter("specfleet_constrained_turns", "Finished grammar-constrained turns "
                                         "(structured outputs, tool calls) by grammar kind", ["kind"], registry=r)
        self.constrained_accepted_length = Histogram(
            "specfleet_constrained_accepted_length", "Tokens committed per target pass in grammar-constrained turns",
            ["kind"], buckets=ACCEPT_BUCKETS, registry=r)
        self.ttft = Histogram("specfleet_time_to_first_token_seconds", "Time to the first token", ["endpoint"],
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)

    def route(self, replica: str, reason: str, spec: dict | None) -> None:
        self.routes.labels(replica, reason).inc()
        if spec is not None:
            self.spec_decisions.labels(f"block_{spec['block_size']}" if spec.get("enabled") else "off").inc()

    def delta(self, replica: str, n_tokens: int, committed: list[int]) -> None:
        if n_tokens:
            self.tokens.labels(replica).inc(n_tokens)
        for a in committed:
            self.accepted_length.labels(replica).observe(a)

    def headroom(self, stats: dict | None) -> None:
        if not stats or not stats.get("replica"):
            return
        rep = stats["replica"]
        self.kv_free.labels(rep).set(stats.get("kv_free_tokens") or 0)
        self.kv_total.labels(rep).set(stats.get("kv_total_tokens") or 0)
        if stats.get("vram_free_bytes") is not None:
            self.vram_free.labels(rep).set(stats["vram_free_bytes"])
        self.replica_running.labels(rep).set(stats.get("num_running") or 0)
        self.replica_waiting.labels(rep).set(stats.get("num_waiting") or 0)

    def finished(self, replica: str, completion_tokens: int, decode_seconds: float) -> None:
        if completion_tokens > 1 and decode_seconds > 0:
            tps = (completion_tokens - 1) / decode_seconds
            self.decode_tps.labels(replica).observe(tps)
            self.tokens_per_s.labels(replica).set(tps)

    def fleet(self, view) -> None:
        """Set the fleet gauges from an orchestrator.fleet.FleetView (per-node series of gone nodes vanish)."""
        if not view.known:
            return
        self.fleet_replicas.labels("expected").set(view.expected_replicas)
        self.fleet_replicas.labels("live").set(len(view.live))
        self.fleet_replicas.labels("suspect").set(len(view.suspects))
        self.fleet_capacity.set(view.capacity)
        self.fleet_nodes.labels("live").set(len(view.nodes))
        self.fleet_nodes.labels("lost").set(len(view.lost_nodes))
        for g in (self.node_replicas, self.node_gpus, self.node_vram_free, self.node_vram_total, self.node_running,
                  self.node_kv_free, self.node_step_ms, self.node_lost):
            g.clear()
        for n in view.nodes:
            self.node_replicas.labels(n.node_id).set(len(n.replicas))
            self.node_gpus.labels(n.node_id).set(n.gpus)
            if n.vram_total_bytes is not None:
                self.node_vram_total.labels(n.node_id).set(n.vram_total_bytes)
                self.node_vram_free.labels(n.node_id).set(n.vram_free_bytes or 0)
            self.node_running.labels(n.node_id).set(n.num_running)
            self.node_kv_free.labels(n.node_id).set(n.kv_free_tokens)
            if n.step_ms_ar is not None:
                self.node_step_ms.labels(n.node_id, "ar").set(n.step_ms_ar)
            for b, ms in n.step_ms_by_block.items():
                self.node_step_ms.labels(n.node_id, f"block_{b}").set(ms)
        for node in view.lost_nodes:
            self.node_lost.labels(node).set(1)
        self.kernels(view.live)
        self.decode_steps(view.live)

    def decode_steps(self, live) -> None:
        """The decode-step gauges of the live replicas (orchestrator.fleet.ReplicaSeen; gone ones vanish)."""
        for g in (self.decode_step_ms, self.decode_step_rows, self.decode_step_tokens, self.step_cost):
            g.clear()
        for rep in live:
            st = rep.stats
            if st is None:
                continue
            for g, v in ((self.decode_step_ms, st.decode_ms), (self.decode_step_rows, st.decode_rows),
                         (self.decode_step_tokens, st.decode_tokens)):
                if v is not None:
                    g.labels(rep.replica_id).set(v)
            tab = st.step_costs
            if tab is None:
                continue
            for batch, ms in zip(*tab.ar):
                self.step_cost.labels(rep.replica_id, "1", str(batch)).set(ms)
            for block, (batches, row) in tab.spec.items():
                for batch, ms in zip(batches, row):
                    self.step_cost.labels(rep.replica_id, str(block), str(batch)).set(ms)

    def kernels(self, live) -> None:
        """The CPU-kernel gauges of the live replicas (orchestrator.fleet.ReplicaSeen; gone ones vanish)."""
        for g in (self.kernel_check, self.kernels_enabled, self.kernel_rel_err):
            g.clear()
        for rep in live:
            k = rep.cpu_kernels
            if k is None:  # not reported yet
                continue
            self.kernel_check.labels(rep.replica_id, k.check).set(1)
            if k.enabled is not None:
                self.kernels_enabled.labels(rep.replica_id, k.check).set(1 if k.enabled else 0)
            if k.rel_err is not None:
                self.kernel_rel_err.labels(rep.replica_id).set(k.rel_err)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
