"""Step costs of the real engine on this machine, for the simulator (benchmarks/stepmodel.py TableStepModel).

Loads workers.engine.LLMEngine in-process as a serving replica would (the target, the given DFlash drafter,
dtype auto = bf16 on this CPU, one torch thread by default: what each replica of benchmarks/configs/cpu_*.yaml
runs) and measures:

* the step-cost table with the engine's own calibration (workers/engine/calibrate.py ``measure_step_costs``: the
  AR step, and the speculative step at each block, at each batch: what a replica measures at start-up and
  reports to the router), once per --contexts length (the engine's own start-up calibration uses 64 tokens;
  agent turns run at a few hundred: the simulator interpolates between the contexts measured);
* prefill: one prompt of each --prefill-tokens length, median of --repeats timed engine steps, fitted as
  fixed + per-token ms.

Run it on a quiet machine (nothing else busy: check `cat /proc/loadavg`); the JSON records the load average.

    python -m benchmarks.calibrate --drafter models/smollm2-135m-dflash-b16 --out runs/step_costs_general.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks import run_meta
from benchmarks.stepmodel import TableStepModel, fit_line


def _ints(text: str) -> list[int]:
    xs = sorted({int(x) for x in text.split(",") if x.strip()})
    if not xs or xs[0] < 1:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return xs


def synthetic_prompt(vocab: int, n: int) -> list[int]:
    """The engine calibration's synthetic prompt shape, n tokens long."""
    return [(7 * i + 11) % vocab for i in range(n)]


def measure_prefill(engine, tokens: int, repeats: int) -> float:
    """Median ms of the engine step that prefills one ``tokens``-long prompt (and samples its first token)."""
    from workers.engine.params import SamplingParams, SpecParams

    vocab = engine.model_config.vocab_size
    times = []
    for i in range(repeats):
        rid = f"prefill-{tokens}-{i}-{time.time_ns()}"
        prompt = [(13 * j + 5 + i) % vocab for j in range(tokens)]
        engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True), SpecParams(enabled=False))
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2", help='HF dir or "smollm2" (the cached demo target)')
    ap.add_argument("--drafter", default="models/smollm2-135m-dflash-b16", help="DFlash dir (relative: repo root)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a replica runs 1)")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--blocks", default="4,8,16")
    ap.add_argument("--contexts", default="64,512", help="prompt tokens of the timed sequences, one table each")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per (batch, block)")
    ap.add_argument("--prefill-tokens", default="128,512,1024")
    ap.add_argument("--repeats", type=int, default=3, help="prefill timings per length")
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        batches, blocks, contexts, prefill = (_ints(a.batches), _ints(a.blocks), _ints(a.contexts),
                                              _ints(a.prefill_tokens))
        if a.steps < 1 or a.repeats < 1 or a.threads < 1:
            raise ValueError("--steps, --repeats and --threads must be >= 1")
    except ValueError as exc:
        ap.error(str(exc))
    drafter = Path(a.drafter).expanduser()
    drafter = drafter if drafter.is_absolute() else run_meta.REPO_ROOT / drafter
    if not (drafter / "config.json").is_file():
        ap.error(f"drafter {a.drafter} not found ({drafter}/config.json)")
    m = run_meta.meta("benchmarks.calibrate", argv)

    import torch

    from workers import hub
    from workers.engine.calibrate import measure_step_costs
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    torch.set_num_threads(a.threads)
    target = str(hub.ensure_model(a.target)) if a.target in hub.ALIASES or a.target in hub.MODELS else a.target
    max_len = max(max(contexts) + (a.steps + 3) * max(blocks) + 64, max(prefill) + 16)
    eng = LLMEngine(EngineConfig(model=target, drafter=str(drafter), device="cpu", dtype=a.dtype,
                                 max_num_seqs=max(batches), max_model_len=max_len, kv_cache_bytes=a.kv_cache_mib << 20))
    vocab = eng.model_config.vocab_size
    measure_step_costs(eng, synthetic_prompt(vocab, 64), [1], [min(blocks)], 2)  # warm-up (kernels, allocator)
    tables = {}
    for ctx in contexts:
        t0 = time.perf_counter()
        costs = measure_step_costs(eng, synthetic_prompt(vocab, ctx), batches, blocks, a.steps)
        tables[str(ctx)] = {k: v for k, v in costs.to_dict().items() if k in ("ar_ms", "spec_ms", "draft_ms")}
        skipped = sorted(set(batches) - set(costs.ar_ms))
        print(f"context {ctx}: {time.perf_counter() - t0:.0f} s; AR ms by batch "
              f"{ {b: round(v, 2) for b, v in costs.ar_ms.items()} }; block {max(blocks)} ms by batch "
              f"{ {b: round(v, 2) for b, v in costs.spec_ms.get(max(blocks), {}).items()} }"
              + (f"; batches skipped (KV / max_num_seqs): {skipped}" if skipped else ""), flush=True)
    pre = {n: measure_prefill(eng, n, a.repeats) for n in prefill}
    fixed, per_token = fit_line(list(pre), list(pre.values()))
    print(f"prefill ms by prompt tokens {({n: round(v, 1) for n, v in pre.items()})} -> "
          f"{fixed:.2f} ms + {per_token:.4f} ms/token", flush=True)
    model = TableStepModel(tables, per_token, fixed, source=(
        f"benchmarks.calibrate {run_meta.utc_now()}: {Path(target).name} + {drafter.name}, dtype "
        f"{str(eng.dtype).removeprefix('torch.')}, {a.threads} torch thread(s), load {run_meta.loadavg()}"))
    out = {**model.to_dict(), "prefill_ms_measured": {str(n): v for n, v in pre.items()},
           "target": target, "drafter": str(drafter), "dtype": str(eng.dtype).removeprefix("torch."),
           "threads": a.threads, "steps": a.steps, "meta": run_meta.finish(m)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out} ({out['meta']['started']} - {out['meta']['ended']}, load {out['meta']['loadavg_start']} "
          f"-> {out['meta']['loadavg_end']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
