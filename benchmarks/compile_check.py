"""Check that GraphRunner(compile=True) (per-layer torch.compile pieces) gives the eager engine's greedy tokens.

    OMP_NUM_THREADS=1 python -m benchmarks.compile_check            # CPU: eager replay, inductor C++ backend
    python -m benchmarks.compile_check --device cuda --mode graph   # GPU: Triton kernels inside CUDA graphs
A tiny random Qwen3 + random DFlash drafter, 5 concurrent requests, AR then DFlash. Prints one line per run.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.params import SamplingParams, SpecParams
from workers.models.loader import load_model

REQS = [(list(range(5, 12)), 14), (list(range(20, 45)), 11), ([9, 4, 33], 16), (list(range(70, 79)), 12),
        ([100, 101], 9)]


def generate(e, spec) -> list[list[int]]:
    got = {str(i): [] for i in range(len(REQS))}
    for i, (p, n) in enumerate(REQS):
        e.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True), spec)
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.new_token_ids
    return [got[str(i)] for i in range(len(REQS))]


def main(argv=None) -> bool:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="auto", help="graph runner mode: auto | eager | graph")
    a = ap.parse_args(argv)
    path = make_tiny_hf_dir(tempfile.mkdtemp() + "/m", "qwen3")
    lm = load_model(path, "float32", a.device)
    cfg = EngineConfig(model=str(path), device=a.device, dtype="float32", kv_block_size=4, kv_cache_bytes=64 << 20,
                       max_num_seqs=6, max_num_batched_tokens=64)
    ok = True
    for spec in (SpecParams(enabled=False), SpecParams(True, 8)):
        e = LLMEngine(cfg, model=lm.model, drafter=tiny_drafter(lm.config, block_size=8).to(a.device),
                      tokenizer=lm.tokenizer)
        ref = generate(e, spec)
        t0 = time.time()
        e.use_graphs(mode=a.mode, compile=True)
        got = generate(e, spec)
        ok &= got == ref
        print(f"{'dflash' if spec.enabled else 'ar'}: compiled == eager: {got == ref} "
              f"({time.time() - t0:.0f} s incl. compile, {torch.__version__}, {a.device})", flush=True)
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
