"""Measure the real engine's step cost on this machine and fit the simulator's LinearStepModel.

Runs workers.engine.LLMEngine in-process (the demo target; the given DFlash drafter, or a random one
of the demo shape — a drafter's cost does not depend on its weights) at several batch sizes, AR and
speculative, and times every engine step after the prefill; prefill cost from the first step.

    python -m benchmarks.calibrate --out runs/stepmodel_cpu.json --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.stepmodel import LinearStepModel, fit_line


def _random_drafter(target_dir: str, out_dir: str, layers: int = 2, block: int = 16) -> str:
    import torch

    from workers.models.dflash import DFlashDrafter, DrafterConfig, save_drafter
    from workers.models.loader import load_model

    cfg = load_model(target_dir, "float32", "cpu").model.config
    torch.manual_seed(0)
    dc = DrafterConfig.for_target(cfg, num_hidden_layers=layers, mask_token_id=3, block_size=block, num_features=5)
    save_drafter(DFlashDrafter(dc), out_dir)
    return out_dir


def measure(engine, batch: int, spec, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(median decode step s, prefill step s) for `batch` sequences."""
    from workers.engine.params import SamplingParams

    for i in range(batch):
        ids = [(17 + 31 * i + 7 * j) % 5000 + 100 for j in range(prompt_len)]
        engine.add_request(f"b{batch}-{i}-{time.time_ns()}", ids,
                           SamplingParams(max_tokens=new_tokens, ignore_eos=True), spec)
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    prefill = times[0]
    steady = times[1: max(2, len(times) - 1)]
    return statistics.median(steady), prefill


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="HF dir (default: the cached demo target)")
    ap.add_argument("--drafter", default=None, help="DFlash dir (default: a random demo-shaped drafter)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch

    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SpecParams
    from workers.hub import model_dir

    torch.set_num_threads(a.threads)
    target = a.target or str(model_dir("smollm2"))
    tmp = tempfile.mkdtemp(prefix="specfleet-cal-")
    drafter = a.drafter or _random_drafter(target, tmp, block=a.block)
    batches = [int(b) for b in a.batches.split(",")]
    eng = LLMEngine(EngineConfig(model=target, drafter=drafter, device="cpu", dtype="float32",
                                 max_num_seqs=max(batches), max_model_len=1024, kv_cache_bytes=256 << 20))
    rows = []
    for b in batches:
        t_ar, pre = measure(eng, b, SpecParams(enabled=False, block_size=a.block), a.prompt_len, a.new_tokens)
        t_sp, _ = measure(eng, b, SpecParams(enabled=True, block_size=a.block), a.prompt_len, a.new_tokens // 2)
        rows.append({"batch": b, "ar_s": t_ar, "spec_s": t_sp, "prefill_s": pre, "prefill_tokens": b * a.prompt_len})
        print(f"batch {b}: AR step {t_ar*1e3:.1f} ms, spec(B={a.block}) step {t_sp*1e3:.1f} ms, "
              f"prefill {b * a.prompt_len} tok {pre*1e3:.0f} ms", flush=True)
    a0, a1 = fit_line([r["batch"] for r in rows], [r["ar_s"] for r in rows])
    s0, s1 = fit_line([r["batch"] * a.block for r in rows], [r["spec_s"] for r in rows])
    p1 = statistics.median(r["prefill_s"] / r["prefill_tokens"] for r in rows)
    model = LinearStepModel(a0, a1, s0, s1, p1, source=(
        f"benchmarks.calibrate {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads={a.threads}, "
        f"drafter={'given' if a.drafter else 'random demo-shaped'}, block={a.block}"))
    model.save(a.out)
    Path(a.out).with_suffix(".rows.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(model.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
