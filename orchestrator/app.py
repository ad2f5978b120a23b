"""The Ray Serve application: `build_app(args) -> Application` (import path `orchestrator.app:build_app`,
for `serve run` / `serve deploy` / the Helm chart's serveConfigV2), plus `start_local()` / `stop_local()`
used by `specfleet serve` and by tests.

Two deployments: `Ingress` (FastAPI, one replica: it owns the SQLite session registry) and
`ModelReplica` (one per fleet entry; replica rank r takes `cfg.fleet()[r]`), routed by the
specfleet request router (orchestrator.routing.router) or a baseline.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator

from ray import serve
from ray.serve.config import RequestRouterConfig

from orchestrator.config import ServeConfig
from orchestrator.replica import ModelReplica

log = logging.getLogger("specfleet.app")
INGRESS_MAX_ONGOING = 4096
STATE_RESOURCE = "specfleet_state"  # custom resource of the node that holds the session registry
LOOPBACK = "127.0.0.1"
# the environment of the local Ray that start_local() starts (its processes inherit it):
# - Ray's single-machine mode (what it uses on macOS / Windows): the node IP is 127.0.0.1 and every Ray server
#   (GCS, raylet, object manager, workers, agents) listens on loopback only, not on all interfaces;
# - the header check inside Serve's HTTP proxy (orchestrator/api/middleware.py: non-UTF-8 headers are a 400).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
PROXY_CALLBACK_ENV = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "orchestrator.api.middleware:proxy_middlewares")


def bind_serve_grpc_to_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0" (every interface) whatever
    the node's IP. On the embedded single-machine Ray (node IP 127.0.0.1, `loopback_ray`) bind it to loopback
    too; a replica must call this in its constructor, which Serve runs before it adds that port. Elsewhere
    (a real cluster: other nodes call this replica) nothing changes."""
    import ray
    from ray.serve._private import replica as serve_replica

    add_port = serve_replica.add_port_to_grpc_server
    if getattr(add_port, "specfleet_loopback", False) or ray.util.get_node_ip_address() != LOOPBACK:
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address[len('[::]:'):]}"
        return add_port(server, address)

    add_port_on_loopback.specfleet_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = add_port_on_loopback


class Ingress:
    """FastAPI ingress; the app is built after the constructor (`__serve_build_asgi_app__`)."""

    async def __init__(self, replicas: Any, args: dict):
        from orchestrator.api.state import ServeBackend, ServerState, load_tokenizer

        bind_serve_grpc_to_loopback()

        cfg = ServeConfig.model_validate(args)
        tokenizer, ctx = await asyncio.to_thread(load_tokenizer, cfg)
        self.state = ServerState.create(cfg, ServeBackend(replicas), tokenizer, ctx)
        self.state.behind_proxy = True  # Serve's proxy sets x-request-id on every response

    def __serve_build_asgi_app__(self):
        from orchestrator.api.server import create_app

        return create_app(self.state)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Graceful shutdown: refuse new work (503), wait for in-flight streams; returns how many remain."""
        state = getattr(self, "state", None)
        if state is None:
            return 0
        state.draining = True
        deadline = time.monotonic() + (state.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        while state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return state.in_flight

    async def __del__(self):  # graceful shutdown: refuse new work, let running streams finish
        state = getattr(self, "state", None)
        if state is None:
            return
        await self.drain()
        state.registry.close()


class LoopbackModelReplica(ModelReplica):
    """ModelReplica whose inter-deployment gRPC port follows the node IP (`bind_serve_grpc_to_loopback`)."""

    async def __init__(self, args: dict):
        bind_serve_grpc_to_loopback()
        await super().__init__(args)


def router_config(cfg: ServeConfig) -> RequestRouterConfig:
    from orchestrator.routing.baselines import ROUTER_CLASSES

    period = cfg.router.stats_period_s
    kwargs = {"weights": cfg.router.weights.model_dump(mode="json")} if cfg.router.policy == "specfleet" else {}
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASSES[cfg.router.policy], request_router_kwargs=kwargs,
        request_routing_stats_period_s=period, request_routing_stats_timeout_s=max(1.0, period))


def _gpus_available() -> bool:
    import ray

    try:
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        return False


def _resolve_tp(cfg: ServeConfig) -> int:
    tps = set()
    for spec in cfg.replicas:
        if spec.tp == "auto":
            tps.add(_planned_tp(cfg))
        else:
            tps.add(int(spec.tp))
    if len(tps) > 1:
        raise ValueError(f"replicas with different tp ({sorted(tps)}) cannot share one Serve deployment; "
                         "run one specfleet application per tp")
    return tps.pop()


def _planned_tp(cfg: ServeConfig) -> int:
    """tp: auto -> the planner's layout for this node (cluster.planning.planner over NVML), 1 where no GPU is visible."""
    if cfg.engine == "mock" or not _gpus_available():
        return 1
    from cluster.planning.nvml import discover
    from cluster.planning.planner import Workload, plan
    from cluster.planning.presets import default_drafter, drafter_from_config, resolve_model
    from cluster.planning.topology import node_from_inventory
    from orchestrator.replica import resolve_paths

    target, drafter_path = resolve_paths(cfg, cfg.replicas[0])
    model = resolve_model(target)
    drafter = drafter_from_config(drafter_path) if drafter_path else None
    if drafter is None and drafter_path is None and cfg.model.drafter:
        drafter = default_drafter(model, cfg.model.block_size)
    w = Workload(max_model_len=cfg.model.max_model_len, block_size=cfg.model.block_size, speculative=drafter is not None)
    chosen = plan(node_from_inventory(discover()), model, drafter, w).chosen
    log.info("tp: auto -> planner chose %s", chosen)
    return int(chosen.tp)


def _ingress_actor_options() -> dict[str, Any]:
    """The ingress owns the SQLite session registry: on a cluster whose head advertises the custom
    resource `specfleet_state` (the Helm chart's head; tests' multi-node clusters) it is pinned there,
    so losing a GPU node never takes the registry with it."""
    import ray

    opts: dict[str, Any] = {"num_cpus": 0}
    try:
        if ray.is_initialized() and ray.cluster_resources().get(STATE_RESOURCE, 0) > 0:
            opts["resources"] = {STATE_RESOURCE: 0.001}
    except Exception:  # no cluster view: unpinned, as on one node
        pass
    return opts


def build_app(args: dict) -> Any:
    """Ray Serve application builder (`serve run orchestrator.app:build_app ...`)."""
    cfg = ServeConfig.model_validate(args or {})
    tp = _resolve_tp(cfg)
    spec0 = cfg.replicas[0]
    gpus = spec0.num_gpus
    if gpus is None:
        gpus = 1.0 if (cfg.engine == "real" and _gpus_available()) else 0.0
    opts: dict[str, Any] = dict(
        name="ModelReplica", num_replicas=cfg.num_replicas,
        max_ongoing_requests=max(s.max_ongoing_requests for s in cfg.replicas),
        health_check_period_s=cfg.health_check_period_s, health_check_timeout_s=cfg.health_check_timeout_s,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s, graceful_shutdown_wait_loop_s=0.5,
        request_router_config=router_config(cfg),
    )
    if tp > 1:  # the replica sits in bundle 0 with no resources of its own; rank actors fill the bundles
        opts["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
        opts["placement_group_bundles"] = [{"CPU": 1, "GPU": gpus}] * tp if gpus else [{"CPU": 1}] * tp
        opts["placement_group_strategy"] = "STRICT_PACK"
    else:
        opts["ray_actor_options"] = {"num_cpus": 0 if cfg.engine == "mock" else 1, "num_gpus": gpus}
    replica = serve.deployment(LoopbackModelReplica).options(**opts)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options=_ingress_actor_options(), graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5, health_check_period_s=5.0,
    )
    args_json = cfg.to_args()
    for spec in args_json["replicas"]:  # replicas build their engines from these resolved values
        spec["tp"], spec["num_gpus"] = tp, gpus
    return ingress.bind(replica.bind(args_json), args_json)


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """While a local Ray starts: its node IP is 127.0.0.1, so GCS, raylet, workers and agents bind to loopback
    (Ray otherwise listens on every interface, unauthenticated when RAY_AUTH_MODE=disabled), and Serve's proxy
    loads specfleet's header check. Restored afterwards: this process may start other clusters (tests)."""
    import ray._private.ray_constants as ray_constants

    env = {**LOCAL_RAY_ENV}
    if not os.environ.get(PROXY_CALLBACK_ENV[0]):  # a deployment's own proxy callback is kept
        env[PROXY_CALLBACK_ENV[0]] = PROXY_CALLBACK_ENV[1]
    saved_env = {k: os.environ.get(k) for k in env}
    saved_mode = ray_constants.ENABLE_RAY_CLUSTER  # read when ray was imported: set it here too
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_mode
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local(cfg: ServeConfig, *, init_ray: bool = True, proxy_location: str | None = None,
                on_ray_ready: Callable[[], None] | None = None) -> str:
    """Start (or reuse) Ray and Serve on this machine, deploy the app, return the base URL.
    A Ray started here (no `ray.address`) listens on loopback only (`loopback_ray`); the HTTP API on `http.host`.
    `proxy_location="HeadOnly"` for several Ray nodes on one machine (their proxies would share a port).
    `on_ray_ready()` runs once Ray is up, before Serve starts (`specfleet serve` takes SIGTERM back from Ray there:
    /health answers while `serve.run` still waits for the app)."""
    import ray

    if init_ray and not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                  log_to_driver=False)
        for attempt in range(3):  # Ray waits a fixed 30 s for its raylet: an overloaded host can miss that
            try:
                if cfg.ray.address:
                    ray.init(address=cfg.ray.address, **kw)
                else:
                    with loopback_ray():
                        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, _node_ip_address=LOOPBACK,
                                 dashboard_host=LOOPBACK, **kw)
                break
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                log.warning("Ray start timed out (attempt %d); retrying", attempt + 1)
                ray.shutdown()
    if on_ray_ready is not None:
        on_ray_ready()
    extra = {"proxy_location": proxy_location} if proxy_location else {}
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, logging_config={"log_level": "WARNING"},
                **extra)
    serve.run(build_app(cfg.to_args()), name=cfg.ray.app_name, route_prefix="/")
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return f"http://{host}:{cfg.http.port}"


def drain_ingresses(timeout_s: float | None = None) -> int:
    """Ask every running app's Ingress to drain (503 for new work, wait for in-flight streams up to
    drain_timeout_s) while the HTTP proxies are still up; returns the number of streams left.
    serve.shutdown() alone tears the proxies down at once and cuts open streams."""
    left = 0
    try:
        apps = list(serve.status().applications)
    except Exception:
        return 0
    for name in apps:
        try:
            left += int(serve.get_app_handle(name).drain.remote(timeout_s).result(timeout_s=None))
        except Exception as exc:  # not a specfleet app, or already gone
            log.debug("drain of app %s skipped: %s", name, exc)
    if not left:
        time.sleep(0.3)  # let the proxies flush the last chunks of the streams that just finished
    return left


def stop_local(shutdown_ray: bool = True) -> None:
    """Graceful: the ingress drains in-flight streams (drain_timeout_s), then Serve and Ray stop."""
    import ray

    try:
        left = drain_ingresses()
        if left:
            log.warning("shutting down with %d stream(s) still running after drain_timeout_s", left)
        serve.shutdown()
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()
