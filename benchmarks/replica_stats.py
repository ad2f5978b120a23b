"""What each replica of a real run reports of its decode steps, read from the server's /metrics and saved in the run
folder (``<name>.replica_stats.json``, benchmarks/router_compare.py ``serve_and_replay``; never_slower runs through
it too):

* ``step_costs``: the step-cost table the engine measured at start-up (workers/engine/calibrate.py; gauge
  ``specfleet_replica_step_cost_ms{replica, block, batch}``, block 1 = the AR step), in the engine's JSON form
  ({"ar_ms": {batch: ms}, "spec_ms": {block: {batch: ms}}}), what the router prices steps with;
* ``decode_ms`` / ``decode_rows`` / ``decode_tokens``: the engine's EWMAs over every decode step (ms, target rows,
  committed tokens; gauges ``specfleet_replica_decode_step_*``), at the last scrape of the run.

benchmarks/validate.py takes a run's saved tables as the simulator's step model when no ``--step-costs`` is given
(``step_models``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.simulator import CALIBRATION_CTX  # context of the engine's start-up calibration steps
from benchmarks.stepmodel import TableStepModel

STEP_COST = "specfleet_replica_step_cost_ms"
DECODE = {"specfleet_replica_decode_step_ms": "decode_ms", "specfleet_replica_decode_step_rows": "decode_rows",
          "specfleet_replica_decode_step_tokens": "decode_tokens"}
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _sample(line: str) -> tuple[str, dict[str, str], float] | None:
    """(name, labels, value) of one exposition line with labels, else None."""
    if "{" not in line or line.startswith("#"):
        return None
    name, rest = line.split("{", 1)
    labels, _, value = rest.rpartition("}")
    try:
        return name, dict(_LABEL.findall(labels)), float(value.strip().split(" ")[0])
    except ValueError:
        return None


def parse_metrics(text: str) -> dict[str, dict]:
    """{replica id: {"step_costs": {"ar_ms", "spec_ms"} (only when measured), "decode_ms", "decode_rows",
    "decode_tokens" (those reported)}} from a /metrics exposition."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.startswith("specfleet_replica_"):
            continue
        s = _sample(line)
        if s is None or "replica" not in s[1]:
            continue
        name, labels, value = s
        rep = out.setdefault(labels["replica"], {})
        if name in DECODE:
            rep[DECODE[name]] = value
        elif name == STEP_COST and "block" in labels and "batch" in labels:
            tab = rep.setdefault("step_costs", {"ar_ms": {}, "spec_ms": {}})
            block, batch = int(labels["block"]), str(int(labels["batch"]))
            if block == 1:
                tab["ar_ms"][batch] = value
            else:
                tab["spec_ms"].setdefault(str(block), {})[batch] = value
    return {rid: d for rid, d in out.items() if d}


def save(path: Path, replicas: dict[str, dict], t_s: float | None) -> None:
    path.write_text(json.dumps({"kind": "replica_stats", "t_s": t_s, "source": "GET /metrics (" + STEP_COST + ", "
                                + ", ".join(DECODE) + ")", "replicas": replicas}, indent=2))


def load(path: Path) -> dict[str, dict]:
    """{replica id: its saved stats}; ValueError for a file that is not a saved replica_stats JSON."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or d.get("kind") != "replica_stats" or not isinstance(d.get("replicas"), dict):
        raise ValueError(f"{path}: not a replica_stats JSON (benchmarks/replica_stats.py)")
    return d["replicas"]


def step_models(path: Path, replica_ids: list[str], prefill_ms_per_token: float = 0.0,
                prefill_ms_fixed: float = 0.0) -> dict[str, TableStepModel]:
    """{replica id: its start-up table as a simulator step model} (decode costs at the calibration's context, the
    same at every context; prefill as given: the start-up calibration does not time it). ValueError when a
    replica in ``replica_ids`` has no saved table with an AR row."""
    saved = load(path)
    out = {}
    for rid in replica_ids:
        tab = (saved.get(rid) or {}).get("step_costs") or {}
        if not tab.get("ar_ms"):
            raise ValueError(f"{path}: replica {rid} has no saved step-cost table (did it calibrate at start-up?); "
                             f"saved: {sorted(saved)}")
        out[rid] = TableStepModel({CALIBRATION_CTX: {"ar_ms": tab["ar_ms"], "spec_ms": tab.get("spec_ms") or {}}},
                                  prefill_ms_per_token, prefill_ms_fixed,
                                  f"{Path(path).name}: replica {rid}'s start-up calibration")
    return out
