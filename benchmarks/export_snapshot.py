"""Export the drafter inside a training checkpoint (workers/training/train.py's checkpoint.pt) as a
z-lab-format DFlash directory, e.g. an early snapshot of a run still in progress as a "less trained"
drafter for heterogeneous-fleet benchmarks.

    python -m benchmarks.export_snapshot --ckpt ~/.cache/specfleet/train/smollm2-135m-dflash-b16/checkpoint.pt \
        --out ~/.cache/specfleet/bench/drafter-early
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    from workers.models.dflash import DFlashDrafter, DrafterConfig, save_drafter

    ck = torch.load(Path(a.ckpt).expanduser(), map_location="cpu", weights_only=False)
    names = {f.name for f in dataclasses.fields(DrafterConfig)}
    cfg = DrafterConfig(**{k: v for k, v in ck["drafter_config"].items() if k in names})
    d = DFlashDrafter(cfg)
    d.load_state_dict(ck["drafter"], strict=True)
    save_drafter(d, Path(a.out).expanduser(), dtype=torch.bfloat16)
    step = (ck.get("state") or {}).get("step")
    (Path(a.out).expanduser() / "snapshot.json").write_text(json.dumps({"ckpt": a.ckpt, "step": step}))
    print(f"wrote {a.out} (training step {step})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
