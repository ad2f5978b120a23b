"""Tensor parallelism on the real demo model: TP=n over Ray rank actors vs the in-process TP=1 engine.

    python -m benchmarks.tp_bench --model smollm2 --tp 3 --tokens 64 [--drafter DIR]

Checks that the greedy tokens are identical and reports start-up time, per-rank load time and decode
tokens/s of each. On a CPU machine this runs gloo over loopback with logical GPUs, so the TP numbers show
the protocol's cost, not a speed-up. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time


async def _generate(group, prompt, n):
    from workers.engine.params import SamplingParams

    t0 = time.perf_counter()
    toks, first = [], None
    async for out in group.generate("bench", prompt, SamplingParams(max_tokens=n, ignore_eos=True)):
        if out.error:
            raise RuntimeError(out.error)
        if first is None and out.new_token_ids:
            first = time.perf_counter()
        toks += out.new_token_ids
    end = time.perf_counter()
    decode_s = end - (first or t0)
    return toks, {"ttft_s": (first or end) - t0, "decode_tok_s": (len(toks) - 1) / decode_s if decode_s > 0 else None}


async def run(model: str, tp: int, tokens: int, drafter: str | None, prompt_text: str) -> dict:
    import ray

    from cluster.runtime.replica_group import ReplicaGroup
    from workers.engine.config import EngineConfig

    if model == "smollm2":
        from workers import hub

        model = str(hub.ensure_model("smollm2"))
    cfg = EngineConfig(model=model, drafter=drafter, device="cpu", dtype="float32", max_num_seqs=4,
                       kv_cache_bytes=64 << 20)
    res: dict = {"model": os.path.basename(model.rstrip("/")), "tp": tp, "tokens": tokens,
                 "drafter": bool(drafter), "load_avg_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    g1 = await ReplicaGroup(cfg, tp=1).start()
    res["tp1_start_s"] = time.perf_counter() - t0
    prompt = g1.tokenizer.encode(prompt_text) if g1.tokenizer is not None else [1, 2, 3]
    try:
        ref, res["tp1"] = await _generate(g1, prompt, tokens)
    finally:
        await g1.shutdown()
    for attempt in range(3):  # Ray 2.60 gives the raylet 30 s to register: a busy machine can miss it
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=max(4, tp), num_gpus=tp, include_dashboard=False, log_to_driver=False)
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    t0 = time.perf_counter()
    g = ReplicaGroup(cfg, tp=tp, torch_threads=1, progress=True, name=f"tp{tp}")
    await g.start()
    res[f"tp{tp}_start_s"] = time.perf_counter() - t0
    res["rank_load_s"] = g.state.load_s
    res["placement"] = [{"rank": r.rank, "bundle": r.bundle_index, "gpu_ids": r.gpu_ids} for r in g.ranks]
    try:
        out, res[f"tp{tp}"] = await _generate(g, prompt, tokens)
    finally:
        await g.shutdown()
    res["identical"] = out == ref
    res["text"] = g1.tokenizer.decode(ref) if g1.tokenizer is not None else None
    res["load_avg_after"] = os.getloadavg()[0]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (the demo model, pulled once) or an HF dir")
    p.add_argument("--tp", type=int, default=3, help="SmolLM2 has 9 heads / 3 KV heads: tp must divide 9 and 3")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--drafter", default=None)
    p.add_argument("--prompt", default="What is 2+2? Explain briefly.")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")  # slow agents on a busy machine
    res = asyncio.run(run(a.model, a.tp, a.tokens, a.drafter, a.prompt))
    print(json.dumps(res))
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
