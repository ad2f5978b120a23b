"""`specfleet serve` as a process, seen from the network (issue 16): every socket the embedded Ray and Serve
listen on is bound to loopback, Ray Serve's proxy answers a non-UTF-8 x-session-id / x-request-id with a 400
(it used to crash with a 500 before our code ran) and stays healthy, and each response has one x-request-id."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers.serving import start_serve

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18743
URL = f"http://127.0.0.1:{PORT}"
LOOPBACK_V6 = ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # gone, or not ours to read
            continue
    return inodes


def _listening(inodes: set[str]) -> list[tuple[str, int]]:
    """(local address, port) of every listening TCP socket among `inodes`, from /proc/net/tcp{,6}."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                if len(addr) == 8:
                    addr = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out.append((addr, int(port, 16)))
    return out


def _loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in LOOPBACK_V6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-security")
    cfg = tmp / "serve.yaml"
    cfg.write_text(json.dumps({
        "engine": "mock", "http": {"port": PORT}, "ray": {"num_cpus": 2},
        "persistence": {"sqlite_path": str(tmp / "sessions.sqlite")}, "auth": {"keys_env": None},
        "replicas": [{"count": 1, "drafter": "none", "mock": {"step_ms": 1}}],
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                                             "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")}
    proc = start_serve(cfg, tmp / "serve.log", URL, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(2)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_embedded_ray_and_serve_listen_on_loopback_only(server):
    sockets = _listening(_socket_inodes(_descendants(server.pid)))
    assert len(sockets) >= 4, sockets  # GCS, raylet, object manager, the HTTP proxy, workers...
    assert any(p == PORT for _, p in sockets), sockets  # the HTTP proxy is in the tree
    exposed = [(a, p) for a, p in sockets if not _loopback(a)]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.parametrize("header", ["x-session-id", "x-request-id"])
def test_non_utf8_headers_are_a_400_through_serves_proxy(server, header):
    body = {"model": "specfleet-demo", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(URL + "/v1/completions", json=body, headers=[(header.encode(), b"bad\xff\xfe")], timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == header
    assert httpx.get(URL + "/health", timeout=10).status_code == 200  # still healthy
    assert httpx.post(URL + "/v1/completions", json=body, timeout=30).status_code == 200


def test_one_x_request_id_per_response(server):
    body = {"model": "specfleet-demo", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(URL + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and len(r.headers.get_list("x-request-id")) == 1, r.headers
    r = httpx.post(URL + "/v1/completions", json=body, headers={"x-request-id": "mine-1"}, timeout=30)
    assert r.headers.get_list("x-request-id") == ["mine-1"], r.headers
