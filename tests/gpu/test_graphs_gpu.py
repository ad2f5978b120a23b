"""CUDA: the graph-captured runner gives the same tokens as the eager engine (AR and speculative, greedy, across
batch buckets), replays without host synchronisation, and the fast loader matches the normal one on the GPU.
Skipped without CUDA (tests/conftest.py); run on the device machine (docs/gpu.md)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import greedy_outputs, make_tiny_hf_dir, reference_greedy, tiny_drafter
from workers.engine.params import SpecParams
from workers.engine.runner import SeqSlice, build_draft_inputs, build_step_inputs

REQS = [(list(range(5, 12)), 20), (list(range(20, 45)), 13), ([9, 4, 33], 18), (list(range(70, 79)), 15),
        ([100, 101], 11)]


def make_engine(path, dtype="float32"):
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.models.loader import load_model

    lm = load_model(path, dtype, "cuda")
    dr = tiny_drafter(lm.config, block_size=8).to("cuda", lm.model.lm_head.weight.dtype)
    cfg = EngineConfig(model=str(path), device="cuda", dtype=dtype, kv_block_size=4, kv_cache_bytes=64 << 20,
                       max_num_seqs=6, max_num_batched_tokens=64)
    return LLMEngine(cfg, model=lm.model, drafter=dr, tokenizer=lm.tokenizer), lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("gpu") / "m", "qwen3")


@pytest.mark.parametrize("nreq", [1, 3, 5])
@pytest.mark.parametrize("spec", [SpecParams(enabled=False), SpecParams(True, 8)], ids=["ar", "spec"])
def test_captured_matches_eager(tiny_dir, nreq, spec):
    e, lm = make_engine(tiny_dir)
    reqs = REQS[:nreq]
    eager = greedy_outputs(e, reqs, spec)
    from workers.models.loader import load_model

    cpu = load_model(tiny_dir, "float32", "cpu").model
    assert eager == [reference_greedy(cpu, p, n) for p, n in reqs]
    g = e.use_graphs()
    assert g.mode == "graph"
    assert greedy_outputs(e, reqs, spec) == eager
    assert g.graphs and all(sg.graph is not None for sg in g.graphs.values())
    assert any(n for k, n in g.hits.items() if k[0] == "target" and k[1] >= nreq)


def test_replay_has_no_host_sync(tiny_dir):
    e, _ = make_engine(tiny_dir)
    g = e.use_graphs()
    bs = e.blocks.block_size
    for i in range(3):
        e.blocks.reserve(f"s{i}", 64)
    tables = [list(e.blocks.ensure(f"s{i}", 40)) for i in range(3)]
    slices = [SeqSlice(list(range(10, 18)), 30, tables[i], list(range(8))) for i in range(3)]
    inp = build_step_inputs(slices, bs, e.device, capture=True)
    d = build_draft_inputs([5, 6, 7], [30] * 3, [8] * 3, tables, e.drafter.config.mask_token_id, bs, e.device)
    ref_t, ref_d = g.run_target(inp)[0].clone(), g.propose_logits(d).clone()  # first calls capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lt, _ = g.run_target(inp)
        ld = g.propose_logits(d)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(lt, ref_t)
    torch.testing.assert_close(ld, ref_d)


def test_bf16_graph_close_to_eager(tiny_dir):
    from workers.engine.runner import ModelRunner

    e, _ = make_engine(tiny_dir, "bfloat16")
    eager = ModelRunner(e.model, e.drafter, e.pool, e.blocks.block_size, e.device)
    g = e.use_graphs()
    e.blocks.reserve("x", 64)
    table = list(e.blocks.ensure("x", 30))
    inp = build_step_inputs([SeqSlice(list(range(4, 12)), 20, table, list(range(8)))], 4, e.device, capture=True)
    le, fe = eager.run_target(inp)
    lg, fg = g.run_target(inp)
    torch.testing.assert_close(lg, le, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fg.float(), fe.float(), rtol=2e-2, atol=2e-2)


def test_fast_loader_on_gpu(tiny_dir):
    from workers.models.init import load_model_fast
    from workers.models.loader import load_model

    ids = torch.randint(0, 128, (2, 9), device="cuda")
    a = load_model_fast(tiny_dir, "bfloat16", "cuda").model
    b = load_model(tiny_dir, "bfloat16", "cuda").model
    assert a.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert torch.equal(a(ids), b(ids))


def test_bench_smoke_on_gpu(tmp_path):
    from benchmarks.gpu_bench import main

    res = main(["--device", "cuda", "--smoke", "--out", str(tmp_path / "b.json")])
    assert {r["mode"] for r in res["steps"]} == {"eager", "graph"}
    assert all(r["ar_ms"] > 0 for r in res["steps"])


@pytest.mark.slow
def test_compiled_graphs_match_eager(tiny_dir):
    e, _ = make_engine(tiny_dir)
    reqs = REQS[:3]
    eager = greedy_outputs(e, reqs, SpecParams(True, 8))
    e.use_graphs(compile=True)
    assert greedy_outputs(e, reqs, SpecParams(True, 8)) == eager
