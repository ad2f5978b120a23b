"""The CPU attention kernel (workers/kernels/cpu_kernels.cpp) against plain-torch attention: short query runs of
many sequences over a paged cache (contiguous and shuffled block tables), causal (target decode / verify) and
non-causal (drafter blocks), fp32 and bf16, GQA groups of 1 and 3, head_dim 64 and 128; and the engine-facing
ragged_attention with the kernel equal to its per-sequence torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: CPU kernels unavailable")


def _reference(q, k_cache, v_cache, meta, tables, scale, causal):
    """Per sequence: gather its keys position by position, SDPA with an explicit mask, in fp32."""
    _, bs, kvh, hd = k_cache.shape
    flat_k, flat_v = k_cache.reshape(-1, kvh, hd).float(), v_cache.reshape(-1, kvh, hd).float()
    out = torch.zeros(q.shape, dtype=torch.float32)
    for row0, n, kv0, slot0, trow in meta.tolist():
        length = kv0 + n
        pos = torch.arange(length)
        slots = slot0 + pos if slot0 >= 0 else tables[trow, pos // bs] * bs + pos % bs
        k, v = flat_k[slots].transpose(0, 1)[None], flat_v[slots].transpose(0, 1)[None]  # [1, kvh, L, hd]
        qi = q[row0: row0 + n].float().transpose(0, 1)[None]  # [1, nh, n, hd]
        mask = pos[None, :] <= (kv0 + torch.arange(n))[:, None] if causal else torch.ones(n, length, dtype=torch.bool)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=kvh != q.shape[1])
        out[row0: row0 + n] = o[0].transpose(0, 1)
    return out


def _case(dtype, nh, kvh, hd, runs, seed=0):
    """runs: (n query rows, kv0 cached keys, contiguous?) per sequence."""
    g = torch.Generator().manual_seed(seed)
    bs, nb = 16, 64
    k_cache = torch.randn(nb, bs, kvh, hd, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, kvh, hd, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(nb, generator=g)[:16] for _ in runs]).contiguous()
    meta, row = [], 0
    for i, (n, kv0, contiguous) in enumerate(runs):
        meta.append((row, n, kv0, (3 + i) * bs if contiguous else -1, i))
        row += n
    q = torch.randn(row, nh, hd, generator=g).to(dtype)
    return q, k_cache, v_cache, np.array(meta, dtype=np.int64), tables


RUNS = [(1, 0, True), (1, 37, False), (16, 100, True), (5, 3, False), (9, 63, True), (1, 150, False)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("nh,kvh,hd", [(9, 3, 64), (4, 4, 128), (6, 2, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_torch_attention(dtype, tol, nh, kvh, hd, causal):
    q, kc, vc, meta, tables = _case(dtype, nh, kvh, hd, RUNS)
    out = torch.full_like(q, float("nan"))
    cpu_kernels.attention(q, kc, vc, out, meta, tables, hd ** -0.5, causal)
    ref = _reference(q, kc, vc, meta, tables, hd ** -0.5, causal)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < tol


def test_kernel_writes_only_the_listed_rows():
    q, kc, vc, meta, tables = _case(torch.float32, 9, 3, 64, RUNS)
    out = torch.full_like(q, 7.0)
    cpu_kernels.attention(q, kc, vc, out, meta[1:2], tables, 0.125, True)  # only sequence 1 (row 1)
    assert (out[0] == 7.0).all() and (out[2:] == 7.0).all() and not (out[1] == 7.0).all()


def test_unsupported_head_dim_keeps_the_torch_path():
    q = torch.zeros(1, 2, 48)
    assert not cpu_kernels.supports_attention(q, torch.zeros(1, 16, 2, 48))
    assert cpu_kernels.supports_attention(torch.zeros(1, 2, 64), torch.zeros(1, 16, 2, 64))
    assert not cpu_kernels.supports_attention(torch.zeros(1, 2, 64, dtype=torch.float16),
                                              torch.zeros(1, 16, 2, 64, dtype=torch.float16))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_ragged_attention_with_and_without_the_kernel(monkeypatch, dtype, tol):
    """A step mixing decode rows, a verify block and a long prefill chunk: the kernel path (short runs in one
    call, the chunk by flash attention) equals one torch call per sequence."""
    from workers.engine.runner import SeqSlice, build_step_inputs
    from workers.models import attention as attn
    from workers.models.attention import CHUNK_SPLIT_MIN, ragged_attention, write_kv

    g = torch.Generator().manual_seed(1)
    nh, kvh, hd, bs, nb = 9, 3, 64, 16, 64
    kc = torch.randn(nb, bs, kvh, hd, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, hd, generator=g).to(dtype)
    specs = [(1, 40, list(range(0, 8))), (16, 90, list(range(8, 16))), (CHUNK_SPLIT_MIN + 9, 20, [30, 17, 40, 22, 9]),
             (1, 7, [50, 51])]
    slices = [SeqSlice([0] * n, start, table, [n - 1]) for n, start, table in specs]
    inp = build_step_inputs(slices, bs, torch.device("cpu"), capture=False)
    n_all = inp.input_ids.shape[0]
    q = torch.randn(n_all, nh, hd, generator=g).to(dtype)
    k = torch.randn(n_all, kvh, hd, generator=g).to(dtype)
    v = torch.randn(n_all, kvh, hd, generator=g).to(dtype)
    write_kv(kc, vc, k, v, inp.attn.slot_mapping)
    with_kernel = ragged_attention(q, k, v, kc, vc, inp.attn, hd ** -0.5)
    monkeypatch.setattr(attn.cpu_kernels, "supports_attention", lambda *a: False)
    without = ragged_attention(q, k, v, kc, vc, inp.attn, hd ** -0.5)
    assert with_kernel.shape == without.shape == (n_all, nh * hd)
    assert (with_kernel.float() - without.float()).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch_with_ties(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5000, generator=g).to(dtype)
    x[2, 10] = x[2, 4000] = 50.0  # a tie: the first index wins, as in torch
    x[3] = 0.0
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    assert torch.equal(cpu_kernels.argmax(x.view(7, 1, 5000)), x.view(7, 1, 5000).argmax(-1))


# ---- the engine through the kernels: fp32 greedy speculative == AR == the full-recompute oracle ----
HD64 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hd64(request, tmp_path_factory):
    """A tiny target and drafter with head_dim 64 (the kernels' shapes): llama runs whole layers through the
    kernels on decode / verify steps, qwen3 (q/k norm) only its attention; the drafter attends through the kernel."""
    from tests.cpu.test_spec import REQS
    from tests.helpers.tiny import reference_greedy, tiny_engine

    eng, lm = tiny_engine(tmp_path_factory.mktemp("hd64"), request.param, drafter_block=8,
                          max_num_batched_tokens=48, model_overrides=HD64)
    return eng, lm, [reference_greedy(lm.model, p, n) for p, n, _, _ in REQS]


def test_engine_through_kernels_is_lossless(hd64, monkeypatch):
    from tests.cpu.test_spec import run_mixed
    from workers.models import llama
    from workers.models.dflash import OwnBlocks

    eng, lm, oracle = hd64
    calls = {"layer": 0, "drafter": 0}
    real_layer, real_draft = llama.DecoderLayer.forward_kernels, OwnBlocks.attend

    def layer(self, *a, **k):
        calls["layer"] += 1
        return real_layer(self, *a, **k)

    def draft(self, *a, **k):
        calls["drafter"] += 1
        return real_draft(self, *a, **k)

    monkeypatch.setattr(llama.DecoderLayer, "forward_kernels", layer)
    monkeypatch.setattr(OwnBlocks, "attend", draft)
    assert run_mixed(eng, all_ar=True) == oracle
    assert run_mixed(eng) == oracle
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    assert calls["drafter"] > 0
    assert (calls["layer"] > 0) == (lm.model.model.layers[0].self_attn.q_norm is None)


def test_drafter_kernel_path_equals_the_gather_path(hd64):
    """The drafter's block proposal through the kernel (block K/V written into the cache, one non-causal call)
    equals the gather + mask path, for blocks of different lengths over contiguous and scattered context."""
    from workers.engine.runner import build_draft_inputs

    eng, _, _ = hd64
    runner, bs = eng.runner, eng.blocks.block_size
    nb = eng.blocks.num_blocks
    g = torch.Generator().manual_seed(5)
    for k, v in runner.pool.drafter:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    tables = [list(range(0, 12)), torch.randperm(nb, generator=g)[:12].tolist(), list(range(20, 32))]
    args = dict(anchors=[5, 9, 17], ctx_lens=[3, 29, 11], blocks=[8, 5, 1], tables=tables,
                mask_token_id=eng.drafter.config.mask_token_id, block_size=bs, device=torch.device("cpu"))
    plain = runner.propose_logits(build_draft_inputs(**args))
    fast = runner.propose_logits(build_draft_inputs(**args, kernel=True))
    for i, n in enumerate(args["blocks"]):  # rows past a block's length are padding on both paths
        assert (fast[i, : n - 1] - plain[i, : n - 1]).abs().max().item() < 1e-4 if n > 1 else True


def test_bf16_model_through_kernels_agrees_with_the_torch_path(tmp_path, monkeypatch):
    """A bf16 model (its RoPE table in bf16 too) decodes through the kernels as through the torch layers, up to
    bf16 numerics: the kernels take fp32 cos / sin, a bf16 table read as fp32 decoded garbage (all token 0 on
    SmolLM2) while every fp32 test passed."""
    import copy

    from tests.cpu.test_spec import REQS
    from tests.helpers.tiny import greedy_outputs, tiny_engine
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SpecParams
    from workers.models import llama

    _, lm = tiny_engine(tmp_path, "llama", drafter_block=None, model_overrides=HD64)
    model = copy.deepcopy(lm.model).to(torch.bfloat16)
    assert model.rope.dtype == torch.bfloat16
    reqs = [(p, n) for p, n, _, _ in REQS]

    def run(kernels: bool):
        with monkeypatch.context() as m:
            if not kernels:
                m.setattr(llama.CausalLM, "kernel_step", lambda self, x, meta: False)
            cfg = EngineConfig(model=str(tmp_path), device="cpu", dtype="bfloat16", kv_block_size=4)
            eng = LLMEngine(cfg, model=model, tokenizer=lm.tokenizer)
            calls = []
            real = llama.DecoderLayer.forward_kernels
            m.setattr(llama.DecoderLayer, "forward_kernels", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
            out = greedy_outputs(eng, reqs, SpecParams(enabled=False))
            assert bool(calls) == kernels
            return out

    fast, plain = run(True), run(False)
    agree = [next((i for i, (a, b) in enumerate(zip(f, p)) if a != b), len(f)) for f, p in zip(fast, plain)]
    assert min(agree) >= 3 and sum(agree) >= 0.8 * sum(len(p) for p in plain), (agree, fast, plain)
