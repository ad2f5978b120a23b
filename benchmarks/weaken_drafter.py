"""Craft a weaker DFlash drafter for heterogeneous-fleet benchmarks: the same checkpoint with Gaussian
noise of relative scale --sigma added to every weight matrix (norm weights kept), so its drafts are
rejected more often at the same cost. The result is a valid z-lab-format checkpoint.

    python -m benchmarks.weaken_drafter --src models/dflash-smollm2 --out ~/.cache/specfleet/bench/weak-drafter --sigma 0.5
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sigma", type=float, default=0.5, help="noise std relative to each tensor's std")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(a.src).expanduser(), Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / "config.json")
    g = torch.Generator().manual_seed(a.seed)
    sd = load_file(str(src / "model.safetensors"))
    noisy = {}
    for k, v in sd.items():
        if v.dim() >= 2:  # projections and fc; norms stay as trained
            x = v.float()
            x = x + torch.randn(x.shape, generator=g) * x.std() * a.sigma
            noisy[k] = x.to(v.dtype).contiguous()
        else:
            noisy[k] = v
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {out} ({len(noisy)} tensors, sigma={a.sigma})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
