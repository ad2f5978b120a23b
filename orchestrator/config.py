"""Serving configuration: one pydantic `ServeConfig` (extra="forbid").

The same schema is read by `specfleet serve config.yaml`, passed as the `args` of the Ray Serve
application (`import_path: orchestrator.app:build_app`) and rendered by the Helm chart into the
RayService `serveConfigV2`. Stability rule: fields are only ever added, never renamed.

Example (YAML):

    model: {name: specfleet-demo, target: smollm2, drafter: default, block_size: 16}
    replicas:
      - {count: 1, tp: 1}                       # the trained drafter
      - {count: 1, tp: 1, drafter: /models/weak} # a weaker drafter: the router learns the difference
    auth: {keys_env: SPECFLEET_API_KEYS}
    persistence: {sqlite_path: /data/sessions.sqlite}
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.routing.score import RouterWeights
from workers.engine.config import EngineConfig
from workers.hub import cache_root


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServedModelConfig(_Strict):
    """The served model pair."""

    name: str = Field("specfleet-demo", min_length=1, description="model id clients send (`model` field)")
    aliases: list[str] = Field(default_factory=list, description="other accepted model ids")
    target: str = Field("smollm2", description='HF dir, .gguf file, or the demo name "smollm2"')
    drafter: str | None = Field(
        "default",
        description='DFlash checkpoint dir; "default" = the bundled demo drafter; null = AR only',
    )
    block_size: int = Field(16, ge=2, le=64, description="default speculative block size")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description='"auto" | "cpu" | "cuda" | "cuda:N"')
    max_model_len: int | None = Field(None, ge=16)

    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]


class MockProfile(_Strict):
    """Behaviour of the torch-free mock engine (engine: mock), per replica."""

    step_ms: float = Field(2.0, ge=0, le=10000, description="time of one target pass (one block) in ms")
    acceptance: float = Field(0.7, ge=0, le=1, description="per-position acceptance probability")
    acceptance_by_role: dict[str, float] = Field(
        default_factory=dict, description="role -> per-position acceptance (overrides `acceptance`)"
    )
    kv_total_tokens: int = Field(65536, ge=64)
    max_model_len: int = Field(4096, ge=16)
    vram_total_bytes: int = Field(0, ge=0, description="reported as one fake GPU when > 0")
    fail_after_tokens: int | None = Field(
        None, ge=1, description="raise inside the engine after this many tokens (fault tests)"
    )
    wedge_after_requests: int | None = Field(
        None, ge=0, description="the step loop hangs once this many requests were admitted (fault tests)"
    )

    @field_validator("acceptance_by_role")
    @classmethod
    def _probabilities(cls, v: dict[str, float]) -> dict[str, float]:
        for role, p in v.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"acceptance_by_role[{role!r}] must be in [0, 1], got {p}")
        return v


class ReplicaSpec(_Strict):
    """One kind of replica in the fleet; `count` identical copies. Fleets may be heterogeneous.
    Fields named as EngineConfig's are that engine field (defaults from EngineConfig; `engine_config`)."""

    count: int = Field(1, ge=1, le=64)
    tp: int | Literal["auto"] = Field(1, description='tensor-parallel degree, or "auto" = use the planner')
    drafter: str | None = Field(
        None, description='override of model.drafter for these replicas; "none" = AR only'
    )
    block_size: int | None = Field(None, ge=2, le=64)
    kv_cache_bytes: int | None = Field(EngineConfig.kv_cache_bytes, ge=1 << 20, description="KV pool on CPU")
    gpu_memory_utilization: float = Field(EngineConfig.gpu_memory_utilization, gt=0, le=1)
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, ge=1, le=1024)
    max_num_batched_tokens: int = Field(EngineConfig.max_num_batched_tokens, ge=16)
    max_ongoing_requests: int = Field(32, ge=1, description="Serve's cap on requests per replica")
    calibrate_step_costs: bool = Field(
        True, description="real engine: time AR and speculative steps at start-up (up to 12 short engine runs: AR and "
        "blocks 4/8/16 at batches 1/4/16, each with its prefill) so the router decides where speculation pays "
        "from this replica's measured costs "
        "(docs/routing.md, 'Step costs'); false: the router uses its live step EWMAs, then a guess (e.g. for tests "
        "that start many engines). Unlike EngineConfig's default (off), on for served replicas. The mock engine "
        "always reports its own step model")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per TP rank (default: 1 if CUDA else 0)")
    mock: MockProfile = Field(default_factory=MockProfile)

    @field_validator("tp")
    @classmethod
    def _tp(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not (1 <= v <= 8):
            raise ValueError(f"tp must be between 1 and 8 or 'auto', got {v}")
        return v


class RouterConfig(_Strict):
    """Routing policy: "specfleet" (orchestrator.routing.router, goodput by measured acceptance and
    headroom), or the baselines "pow2" (Serve's default) and "consistent_hash" (session affinity)."""

    policy: Literal["specfleet", "pow2", "consistent_hash"] = "specfleet"
    stats_period_s: float = Field(1.0, gt=0, le=60)
    weights: RouterWeights = Field(default_factory=RouterWeights, description="scoring knobs")


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1, description="default: the model's context")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)
    max_stop: int = Field(4, ge=0, le=64)
    max_messages: int = Field(256, ge=1)
    per_key_concurrency: int = Field(64, ge=1, description="requests running at once per API key")
    per_key_queue: int = Field(256, ge=0, description="requests waiting per API key beyond that")
    queue_timeout_s: float = Field(30.0, gt=0, description="longest wait in the per-key queue")
    retry_after_s: int = Field(1, ge=1)
    max_sessions_per_key: int = Field(10000, ge=1)

    @model_validator(mode="after")
    def _defaults_fit(self) -> "LimitsConfig":
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)  # the server cap wins
        return self


class AuthConfig(_Strict):
    """API keys from any mix of: inline list, an env var (comma separated), a file (one per line,
    e.g. a Kubernetes Secret mounted as a volume). No keys at all = authentication off."""

    keys: list[str] = Field(default_factory=list)
    keys_env: str | None = "SPECFLEET_API_KEYS"
    keys_file: str | None = None
    required: bool = Field(False, description="refuse to start when no key is configured")

    @field_validator("keys")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("auth.keys must not contain empty keys")
        return [k.strip() for k in v]

    def resolve_keys(self) -> list[str]:
        """All configured keys (never logged)."""
        keys = list(self.keys)
        if self.keys_env and os.environ.get(self.keys_env):
            keys += [k.strip() for k in os.environ[self.keys_env].split(",") if k.strip()]
        if self.keys_file:
            path = Path(self.keys_file)
            if not path.is_file():
                raise ValueError(f"auth.keys_file {self.keys_file} does not exist")
            keys += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if self.required and not keys:
            raise ValueError("auth.required is set but no API key is configured")
        return list(dict.fromkeys(keys))


class PersistenceConfig(_Strict):
    sqlite_path: str | None = Field(None, description="default: <cache>/sessions.sqlite; ':memory:' = none")

    def resolved_path(self) -> str:
        return self.sqlite_path or str(cache_root() / "sessions.sqlite")


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start a local Ray; else e.g. 'auto'")
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0, description="local Ray only; logical GPUs allowed")
    app_name: str = "specfleet"


class ServeConfig(_Strict):
    model: ServedModelConfig = Field(default_factory=ServedModelConfig)
    replicas: list[ReplicaSpec] = Field(default_factory=lambda: [ReplicaSpec()], min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    persistence: PersistenceConfig = Field(default_factory=PersistenceConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    engine: Literal["real", "mock"] = "real"
    ingress_replicas: int = Field(1, ge=1, le=1, description="one ingress: it owns the SQLite registry")
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown: wait for in-flight streams")
    health_check_period_s: float = Field(5.0, gt=0, le=600, description="Serve health checks of replicas")
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600)

    def engine_config(self, spec: ReplicaSpec, target: str, drafter: str | None) -> EngineConfig:
        """The EngineConfig of a replica: every field named as an EngineConfig field is taken from the served
        model (dtype, device, max_model_len) and from the replica spec (KV and batching limits) by name."""
        engine = {f.name for f in fields(EngineConfig)} - {"model", "drafter"}
        kw = {k: getattr(self.model, k) for k in engine & set(ServedModelConfig.model_fields)}
        kw.update({k: getattr(spec, k) for k in engine & set(ReplicaSpec.model_fields)})
        return EngineConfig(model=target, drafter=drafter, spec_block_size=spec.block_size or self.model.block_size,
                            **kw)

    def fleet(self) -> list[ReplicaSpec]:
        """One spec per replica, in rank order (a spec with count=n appears n times)."""
        return [spec for spec in self.replicas for _ in range(spec.count)]

    @property
    def num_replicas(self) -> int:
        return sum(s.count for s in self.replicas)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ServeConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the top level must be a mapping")
        return cls.model_validate(data)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        return cls.model_json_schema()

    def to_args(self) -> dict[str, Any]:
        """JSON-safe dict for Ray Serve's application `args` (round-trips through model_validate)."""
        return self.model_dump(mode="json")
