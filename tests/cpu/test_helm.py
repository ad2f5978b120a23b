"""The Helm chart (helm/specfleet), rendered offline with helm-python-sdk (Helm's Go SDK through
ctypes; no helm binary, no cluster).

Checks: default values and every profile render and lint cleanly; every rendered RayService passes
the vendored KubeRay CRD schema (strict: unknown fields rejected, as kubectl's strict field
validation does); the serve config inside it passes Ray Serve's own schema and specfleet's
ServeConfig; bad values fail at render time with a message naming the problem.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specfleet"
CRDS = ROOT / "tests" / "fixtures" / "kuberay"
PROFILES = ["values-dgx-b300.yaml", "values-dgx-b300-2nodes.yaml", "values-single-gpu.yaml"]
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def chart():
    return helm.Chart.load(str(CHART))


def profile(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    return yaml.load((CHART / name).read_text(), Loader=Loader)


def render(values: dict[str, Any] | None = None, name: str = "sf", namespace: str = "ai") -> list[dict]:
    """Render and parse every manifest (NOTES.txt excluded)."""
    out = chart().render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.load_all(text, Loader=Loader) if d]
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    return chart().render(values or {}, name="sf", namespace="ai")["specfleet/templates/NOTES.txt"]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema in which every object with declared properties rejects
    unknown fields (the API server prunes them silently; kubectl --validate=strict refuses)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(filename: str, version: str = "v1"):
    crd = yaml.load((CRDS / filename).read_text(), Loader=Loader)
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(ver["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    v = crd_validator("ray.io_rayservices.yaml")
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


def _deployment_names(application) -> set[str]:
    d = application._bound_deployment
    names = {d.name}
    for arg in [*d.init_args, *d.init_kwargs.values()]:
        if hasattr(arg, "_bound_deployment"):
            names |= _deployment_names(arg)
    return names


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as ei:
        chart().render(values, name="sf", namespace="ai")
    return str(ei.value)


# --------------------------------------------------------------------------------------------
# good values: defaults and profiles


@pytest.mark.parametrize("prof", [None, *PROFILES])
def test_renders_valid_rayservice(prof):
    docs = render(profile(prof))
    (rs,) = by_kind(docs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = crd_errors(rs)
    assert not errors, "\n".join(errors)

    # the worker group's GPUs come from gpusPerNode
    values = chart().merge_values(profile(prof))
    (wg,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (ctr,) = wg["template"]["spec"]["containers"]
    gpus = values["gpuWorkers"]["gpusPerNode"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert wg["replicas"] == values["gpuWorkers"]["replicas"]
    vols = {v["name"]: v for v in wg["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "model-cache" in vols
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    # KubeRay's documented form for custom resources; the Ingress deployment asks for this one
    assert head["rayStartParams"]["resources"] == '"{\\"specfleet_state\\": 1}"'


@pytest.mark.parametrize("prof", [None, *PROFILES])
def test_serve_config_is_specfleets_own_schema(prof):
    """One source of truth: the application args are a valid ServeConfig, the whole
    serveConfigV2 is a valid Ray Serve config, and what the chart passes is what values say."""
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.config import ServeConfig

    (rs,) = by_kind(render(profile(prof)), "RayService")
    sc = serve_config(rs)
    ServeDeploySchema.model_validate(sc)
    (app,) = sc["applications"]
    assert app["import_path"] == "orchestrator.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert app["args"] == chart().merge_values(profile(prof))["serve"]
    # the application builder accepts it, and the per-deployment overrides name real deployments
    from orchestrator.app import build_app

    built = build_app(app["args"])
    assert {d["name"] for d in app["deployments"]} <= _deployment_names(built)
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert ingress["ray_actor_options"]["resources"] == {"specfleet_state": 0.001}
    # the Serve proxy listens where the Service and probes expect it
    assert sc["http_options"] == {"host": "0.0.0.0", "port": cfg.http.port}
    head_ctr = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": cfg.http.port} in head_ctr["ports"]
    # API keys reach the pods under the env var the config reads
    env = {e["name"]: e for e in head_ctr["env"]}
    assert env[cfg.auth.keys_env]["valueFrom"]["secretKeyRef"]["key"] == "api-keys"


def test_cluster_spec_is_a_valid_raycluster_spec():
    """The RayService embeds a RayCluster spec: check it against the RayCluster CRD as well."""
    (rs,) = by_kind(render(profile("values-dgx-b300.yaml")), "RayService")
    v = crd_validator("ray.io_rayclusters.yaml")
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
               "spec": rs["spec"]["rayClusterConfig"]}
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(cluster)]
    assert not errors, "\n".join(errors)


def test_dgx_b300_profile_plan():
    from orchestrator.config import ServeConfig

    (rs,) = by_kind(render(profile("values-dgx-b300.yaml")), "RayService")
    cfg = ServeConfig.model_validate(serve_config(rs)["applications"][0]["args"])
    assert sum(spec.tp for spec in cfg.fleet()) == 8  # the whole node, no idle GPU
    (wg,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert wg["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert wg["template"]["spec"]["volumes"][-1]["hostPath"]["path"] == "/raid/specfleet-models"
    docs = render(profile("values-dgx-b300.yaml"))
    assert by_kind(docs, "ServiceMonitor")


def test_dgx_b300_two_node_profile_is_the_planners_layout():
    """Two DGX B300 worker pods, 8 GPUs each, 8 replicas of TP2: what `specfleet plan --nodes 2
    --helm-values` prints for Qwen3-32B at 128 sequences; the head is not pinned to a DGX and the
    model cache is a shared claim (the head must survive the loss of a DGX and read the tokenizer)."""
    from argparse import Namespace

    from orchestrator.commands.plan import build, helm_values
    from orchestrator.config import ServeConfig

    values = profile("values-dgx-b300-2nodes.yaml")
    p = build(Namespace(node="dgx-b300", nodes=2, model="qwen3-32b", drafter="auto", max_model_len=None,
                        concurrency=128, avg_context=4096, tau=4.0, block_size=16, gpu_memory_utilization=0.9,
                        dtype="auto"))
    planned = helm_values(p)
    assert {k: values["gpuWorkers"][k] for k in planned["gpuWorkers"]} == planned["gpuWorkers"]
    (spec,) = values["serve"]["replicas"]
    assert (spec["count"], spec["tp"], spec["num_gpus"]) == (8, 2, 1) == (
        planned["serve"]["replicas"][0]["count"], planned["serve"]["replicas"][0]["tp"], 1)
    (rs,) = by_kind(render(values), "RayService")
    cfg = ServeConfig.model_validate(serve_config(rs)["applications"][0]["args"])
    assert sum(s.tp for s in cfg.fleet()) == 16
    (wg,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert wg["replicas"] == wg["minReplicas"] == wg["maxReplicas"] == 2
    assert wg["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head  # not on a DGX
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "specfleet-models-rwx"}} in head["volumes"]
    # the plan's fragment on top of the single-node profile renders (the chart's GPU packing check agrees)
    assert by_kind(render({**profile("values-dgx-b300.yaml"), **planned,
                           "serve": {**profile("values-dgx-b300.yaml")["serve"], **planned["serve"]}}),
                   "RayService")
    # one more replica than the plan does not fit two nodes
    over = {"gpuWorkers": planned["gpuWorkers"], "serve": {"replicas": [{"count": 9, "tp": 2}]}}
    assert "needing 18 GPUs in total" in render_error(over)


@pytest.mark.parametrize("prof", [None, *PROFILES])
def test_lint_passes(prof):
    report = helm.lint(str(CHART), profile(prof) or None, strict=True)
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_values_schema_is_generated_from_serveconfig():
    sys.path.insert(0, str(ROOT / "helm"))
    try:
        import gen_values_schema as gen
    finally:
        sys.path.pop(0)
    text = gen.SCHEMA_PATH.read_text()
    assert gen.render(gen.build(json.loads(text))) == text, (
        "helm/specfleet/values.schema.json is stale: run python helm/gen_values_schema.py")


def test_endpoint_service_secret_pvc_pdb():
    docs = render()
    (rs,) = by_kind(docs, "RayService")
    svc = rs["spec"]["serveService"]
    assert svc["metadata"]["name"] == "sf-specfleet"
    assert svc["spec"]["ports"][0]["name"] == "serve"
    (secret,) = by_kind(docs, "Secret")
    import base64

    key = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert key.startswith("sk-specfleet-") and len(key) > 40  # a random key when none is given
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    head_vols = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in head_vols
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs} == {
        "ray-head", "gpu-worker"}
    assert not by_kind(docs, "Ingress") and not by_kind(docs, "ServiceMonitor")


def test_optional_objects():
    docs = render({
        "apiKeys": {"existingSecret": "my-keys", "secretKey": "keys"},
        "ingress": {"enabled": True, "className": "nginx",
                    "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                    "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "state": {"existingClaim": "sessions-pvc"},
        "podDisruptionBudget": {"enabled": False},
        "service": {"type": "LoadBalancer"},
    })
    assert not by_kind(docs, "Secret") and not by_kind(docs, "PersistentVolumeClaim")
    assert not by_kind(docs, "PodDisruptionBudget")
    (rs,) = by_kind(docs, "RayService")
    assert not crd_errors(rs)
    env = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"key": "keys", "name": "my-keys"}
    (ing,) = by_kind(docs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == rs["spec"]["serveService"]["metadata"]["name"]
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics", "serve"}
    assert "llm.example.com" in notes({"ingress": {"enabled": True, "hosts": [
        {"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]}})


def test_explicit_keys_are_joined():
    import base64

    (secret,) = by_kind(render({"apiKeys": {"keys": ["sk-alpha-0001", "sk-bravo-0002"]}}), "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "sk-alpha-0001,sk-bravo-0002"


def test_notes_tell_how_to_call():
    text = notes()
    assert "port-forward svc/sf-specfleet 8000:8000" in text
    assert "Authorization: Bearer" in text and "x-session-id" in text


# --------------------------------------------------------------------------------------------
# bad values fail at render time with a clear message


def test_negative_replicas_rejected():
    msg = render_error({"gpuWorkers": {"replicas": -1}})
    assert "/gpuWorkers/replicas" in msg and "minimum" in msg
    msg = render_error({"serve": {"replicas": [{"count": -2, "tp": 1}]}})
    assert "/serve/replicas/0/count" in msg and "minimum" in msg


def test_unknown_keys_rejected():
    msg = render_error({"gpuWorker": {"replicas": 1}})
    assert "gpuWorker" in msg and "additional properties" in msg
    msg = render_error({"serve": {"model": {"targett": "x"}}})
    assert "/serve/model" in msg and "targett" in msg


def test_wrong_types_rejected():
    msg = render_error({"gpuWorkers": {"gpusPerNode": "eight"}})
    assert "/gpuWorkers/gpusPerNode" in msg
    msg = render_error({"serve": {"limits": {"max_tokens": "many"}}})
    assert "/serve/limits/max_tokens" in msg
    msg = render_error({"service": {"type": "Bogus"}})
    assert "/service/type" in msg


@pytest.mark.parametrize(
    "gpu_values, replicas, expect",
    [
        ({"gpusPerNode": 1}, [{"count": 1, "tp": 2}], "needs tp=2 x num_gpus=1 = 2 GPUs"),
        ({"gpusPerNode": 8}, [{"count": 5, "tp": 2}], "needing 10 GPUs in total"),
        ({"gpusPerNode": 8, "replicas": 2}, [{"count": 3, "tp": 5}], "does not pack: 3 replica(s) need 15 of the 16 GPUs"),
        ({"gpusPerNode": 4, "replicas": 0}, [{"count": 1, "tp": 1}], "gpuWorkers.replicas=0"),
    ],
)
def test_gpu_plan_must_fit(gpu_values, replicas, expect):
    msg = render_error({"gpuWorkers": gpu_values, "serve": {"replicas": replicas}})
    assert expect in msg, msg


def test_gpu_plan_that_fits_renders():
    # 2 nodes x 8: 4 x tp4 packs exactly; fractional GPUs per rank pack too
    assert by_kind(render({"gpuWorkers": {"gpusPerNode": 8, "replicas": 2},
                           "serve": {"replicas": [{"count": 4, "tp": 4}]}}), "RayService")
    assert by_kind(render({"gpuWorkers": {"gpusPerNode": 1},
                           "serve": {"replicas": [{"count": 2, "tp": 1, "num_gpus": 0.5}]}}), "RayService")


def test_mixed_tp_rejected():
    """orchestrator.app serves all replicas from one Serve deployment, hence one tp."""
    msg = render_error({"gpuWorkers": {"gpusPerNode": 8},
                        "serve": {"replicas": [{"count": 2, "tp": 2}, {"count": 4, "tp": 1}]}})
    assert "mixes tp values" in msg, msg


def test_inconsistent_paths_rejected():
    msg = render_error({"serve": {"persistence": {"sqlite_path": "/tmp/sessions.sqlite"}}})
    assert "serve.persistence.sqlite_path" in msg and "state.mountPath" in msg
    msg = render_error({"serve": {"http": {"host": "127.0.0.1"}}})
    assert "serve.http.host must be 0.0.0.0" in msg
    msg = render_error({"modelCache": {"type": "hostPath"}})
    assert "modelCache.hostPath" in msg
    msg = render_error({"head": {"rayStartParams": {"resources": '{"GPU_X": 1}'}}})
    assert "head.rayStartParams.resources is set by the chart" in msg


def test_strict_crd_check_catches_mistakes():
    """The CRD check itself can fail: a misspelt field and a wrong type are reported."""
    (rs,) = by_kind(render(), "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 1
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    errors = crd_errors(bad)
    assert any("replica" in e for e in errors) and any("num-gpus" in e for e in errors), errors


def test_render_cli(capsys):
    """helm/render.py: `helm template` without a binary (repeated --set merge like helm's)."""
    sys.path.insert(0, str(ROOT / "helm"))
    try:
        import render as render_cli
    finally:
        sys.path.pop(0)
    assert render_cli.main(["-f", str(CHART / "values-dgx-b300.yaml"), "--namespace", "llm"]) == 0
    out = capsys.readouterr().out
    (rs,) = [d for d in yaml.load_all(out, Loader=Loader) if d and d.get("kind") == "RayService"]
    assert not crd_errors(rs)
    assert render_cli.main(["--set", "gpuWorkers.gpusPerNode=8", "--set", "serve.replicas[0].count=5",
                            "--set", "serve.replicas[0].tp=2"]) == 1
    assert "needing 10 GPUs in total" in capsys.readouterr().err
    assert render_cli.main(["--lint", "-f", str(CHART / "values-single-gpu.yaml")]) == 0
