"""ServeConfig: YAML loading, strictness, fleet expansion, key sources, JSON schema."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.config import ReplicaSpec, ServeConfig


def test_defaults_round_trip_through_args():
    cfg = ServeConfig()
    assert ServeConfig.model_validate(cfg.to_args()) == cfg
    assert cfg.num_replicas == 1 and cfg.http.port == 8000 and cfg.engine == "real"


def test_unknown_field_is_rejected_at_every_level():
    with pytest.raises(ValidationError, match="bogus"):
        ServeConfig.model_validate({"bogus": 1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ServeConfig.model_validate({"replicas": [{"count": 1, "tpp": 2}]})


def test_yaml_heterogeneous_fleet(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "engine: mock\n"
        "replicas:\n"
        "  - {count: 2, tp: 1}\n"
        "  - {count: 1, tp: auto, drafter: none, mock: {acceptance: 0.1}}\n"
    )
    cfg = ServeConfig.from_yaml(path)
    fleet = cfg.fleet()
    assert [s.tp for s in fleet] == [1, 1, "auto"]
    assert fleet[2].drafter == "none" and fleet[2].mock.acceptance == 0.1
    assert cfg.num_replicas == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"replicas": []},
        {"replicas": [{"tp": 0}]},
        {"replicas": [{"tp": 16}]},
        {"replicas": [{"mock": {"acceptance_by_role": {"coder": 1.5}}}]},
        {"engine": "fake"},
    ],
)
def test_invalid_values(bad):
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(bad)


def test_default_max_tokens_is_capped_by_the_limit():
    assert ServeConfig.model_validate({"limits": {"max_tokens": 5}}).limits.default_max_tokens == 5


def test_missing_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ServeConfig.from_yaml(tmp_path / "nope.yaml")


def test_keys_from_inline_env_and_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# secret\nk-file\n\n")
    monkeypatch.setenv("MY_KEYS", "k-env1, k-env2")
    cfg = ServeConfig.model_validate({"auth": {"keys": ["k-inline"], "keys_env": "MY_KEYS", "keys_file": str(f)}})
    assert cfg.auth.resolve_keys() == ["k-inline", "k-env1", "k-env2", "k-file"]
    with pytest.raises(ValueError, match="no API key"):
        ServeConfig.model_validate({"auth": {"keys_env": None, "required": True}}).auth.resolve_keys()


def test_json_schema_describes_every_section():
    schema = ServeConfig.json_schema()
    assert schema["additionalProperties"] is False
    assert {"model", "replicas", "router", "limits", "auth", "persistence", "http", "engine"} <= set(schema["properties"])


def test_serve_cli_check_and_schema(tmp_path, capsys):
    import json

    from orchestrator.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("replicas: [{count: 2}]\nhttp: {port: 9001}\n")
    assert main(["serve", str(path), "--check", "--mock", "--port", "9002", "--db", ":memory:"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "mock" and out["http"]["port"] == 9002 and out["replicas"][0]["count"] == 2
    assert out["persistence"]["sqlite_path"] == ":memory:"
    assert main(["serve", "--print-schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ServeConfig"
    path.write_text("replicas: [{count: 0}]\n")
    assert main(["serve", str(path), "--check"]) == 1  # a clear message, no traceback
    assert "greater than or equal to 1" in capsys.readouterr().err


def test_engine_fields_have_one_source():
    """A replica's EngineConfig takes every same-named field from the served model and the replica spec;
    their defaults are EngineConfig's."""
    from workers.engine.config import EngineConfig

    cfg = ServeConfig.model_validate({"model": {"dtype": "float32", "device": "cpu", "max_model_len": 512,
                                                "block_size": 8},
                                      "replicas": [{"max_num_seqs": 4, "kv_cache_bytes": 8 << 20},
                                                   {"block_size": 4, "gpu_memory_utilization": 0.5}]})
    a, b = (cfg.engine_config(s, "/m", None) for s in cfg.fleet())
    assert (a.dtype, a.device, a.max_model_len, a.max_num_seqs, a.kv_cache_bytes, a.spec_block_size) == \
        ("float32", "cpu", 512, 4, 8 << 20, 8)
    assert (b.spec_block_size, b.gpu_memory_utilization, b.max_num_seqs) == (4, 0.5, EngineConfig.max_num_seqs)
    default = ServeConfig().engine_config(ReplicaSpec(), "/m", "/d")
    # served replicas calibrate their step costs by default (EngineConfig's own default is off)
    assert default == EngineConfig(model="/m", drafter="/d", spec_block_size=16, calibrate_step_costs=True)
    off = ServeConfig.model_validate({"replicas": [{"calibrate_step_costs": False}]})
    assert not off.engine_config(off.fleet()[0], "/m", None).calibrate_step_costs
