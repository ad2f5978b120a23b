"""`specfleet serve config.yaml` as a real process: graceful Ctrl-C drains an in-flight stream, and the session
registry survives a restart of the whole process; SIGTERM (kill, systemd, Docker, Kubernetes) drains the same way
instead of dying in Ray's own SIGTERM handler."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.helpers.serving import start_serve

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18742
URL = f"http://127.0.0.1:{PORT}"
AUTH = {"authorization": "Bearer cli-key"}


def _start(cfg_path, log_path):
    return start_serve(cfg_path, log_path, URL, env=dict(os.environ, RAY_AUTH_MODE="disabled"))


def _write_config(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "engine": "mock", "http": {"port": PORT}, "ray": {"num_cpus": 2}, "drain_timeout_s": 30,
        "persistence": {"sqlite_path": str(tmp_path / "sessions.sqlite")},
        "auth": {"keys": ["cli-key"], "keys_env": None},
        "replicas": [{"count": 1, "drafter": "none", "mock": {"step_ms": 15}}],
    }))
    return cfg


def _signal_during_a_stream(proc, signum, headers) -> tuple[list[str], int | None]:
    """Start a 200-token stream, send `signum` once its first event arrived (200 AR steps x 15 ms = 3 s of stream
    still to go), and return the stream's lines and the process's exit code (None: still running after 90 s)."""
    body = {"model": "specfleet-demo", "prompt": "hi", "max_tokens": 200, "stream": True}
    lines: list[str] = []

    def stream():
        with httpx.stream("POST", URL + "/v1/completions", json=body, headers={**AUTH, **headers},
                          timeout=60) as r:
            lines.extend(r.iter_lines())

    t = threading.Thread(target=stream)
    t.start()
    while not any(ln.startswith("data: ") for ln in lines) and t.is_alive():
        time.sleep(0.05)
    proc.send_signal(signum)
    t.join(60)
    try:
        rc = proc.wait(90)
    except subprocess.TimeoutExpired:
        rc = None
    return lines, rc


def _assert_stream_finished(lines: list[str]) -> None:
    events = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]", lines[-5:]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    assert len(text) == 200  # the in-flight stream finished in full


def test_serve_process_drains_on_sigint_and_keeps_sessions(tmp_path):
    cfg = _write_config(tmp_path)
    log = tmp_path / "serve.log"
    proc = _start(cfg, log)
    try:
        sid = httpx.post(URL + "/v1/sessions", json={"role": "coder", "team": "t"}, headers=AUTH).json()["id"]
        lines, rc = _signal_during_a_stream(proc, signal.SIGINT, {"x-session-id": sid})
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_stream_finished(lines)

    proc = _start(cfg, log)  # the whole process again: the session and its turn are still there
    try:
        s = httpx.get(f"{URL}/v1/sessions/{sid}", headers=AUTH).json()
        assert s["turns"] == 1 and s["completion_tokens"] == 200 and s["role"] == "coder"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(90)


def test_serve_process_drains_on_sigterm(tmp_path):
    """`kill PID` used to end in Ray's C++ handler ("*** SIGTERM received at time=...", then Aborted): no drain,
    no clean stop. Now SIGTERM runs the Ctrl-C path: the in-flight stream finishes, exit code 0."""
    cfg = _write_config(tmp_path)
    log = tmp_path / "serve.log"
    proc = _start(cfg, log)
    try:
        lines, rc = _signal_during_a_stream(proc, signal.SIGTERM, {})
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, (rc, text[-3000:])
    assert "SIGTERM received" not in text, text[-3000:]
    assert "specfleet: SIGTERM: shutting down" in text and "specfleet: stopped." in text, text[-3000:]
    _assert_stream_finished(lines)
