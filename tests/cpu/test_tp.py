"""Tensor-parallel sharding over gloo (2 processes): logits, embedding and lm_head equal the unsharded model.

Covers the awkward cases in one spawn: Qwen3 with tied embeddings and 1 KV head over 2 ranks (KV head
replicated), and Llama with q/k/v/o + MLP biases (row-parallel bias added once) and an odd vocabulary
(vocab-parallel padding). The lock-step driver/follower protocol carries every call.
"""
from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_dir
from workers.parallel.tp import check_tp, kv_heads_of

VARIANTS = {
    "qwen3-tied-kv1": ("qwen3", dict(num_key_value_heads=1)),
    "llama-bias-oddvocab": ("llama", dict(attention_bias=True, mlp_bias=True, vocab_size=127)),
}
IDS = [[5, 9, 17, 33, 2, 100, 7, 64], [1, 3, 3, 120, 8, 8, 9, 11]]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.tensor(IDS), torch.randn(3, 64, generator=g)


def _reference(path):
    from workers.models.loader import load_model

    m = load_model(path, "float32", "cpu").model
    ids, h = _inputs()
    with torch.inference_mode():
        return m.forward(ids).numpy(), m.embed(ids).numpy(), m.logits(h).numpy()


def _rank(rank, world, paths, port, q):
    import torch.distributed as dist

    from workers.models.loader import load_model
    from workers.parallel.tp import TPContext, drive, follow, shard_causal_lm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, path in paths.items():
            m = load_model(path, "float32", "cpu").model
            ctx = TPContext(rank, world, torch.device("cpu"))
            shard_causal_lm(m, ctx)
            if rank == 0:
                drv = drive(m, ctx)
                ids, h = _inputs()
                with torch.inference_mode():
                    res = (m.forward(ids).numpy(), m.embed(ids).numpy(), m.logits(h).numpy())
                drv.stop()
                q.put((name, res, m.config.num_key_value_heads, m.model.layers[0].self_attn.k_proj.out_features))
            else:
                q.put((f"follower-{name}", follow(m, ctx), None, None))
        dist.barrier()  # tear down together: a rank leaving while its peer is mid-collective aborts gloo
    finally:
        dist.destroy_process_group()


def test_check_tp_and_kv_heads():
    from tests.helpers.tiny import tiny_hf_config
    from workers.models.config import ModelConfig

    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))  # 4 heads, 2 KV heads
    check_tp(cfg, 2)
    assert [kv_heads_of(cfg, r, 2) for r in range(2)] == [(0, 1), (1, 2)]
    assert [kv_heads_of(cfg, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="do not split 3 ways"):
        check_tp(cfg, 3)


@pytest.mark.slow
def test_tp2_matches_unsharded(tmp_path):
    paths = {k: str(make_tiny_hf_dir(tmp_path / k, fam, with_tokenizer=False, **ov))
             for k, (fam, ov) in VARIANTS.items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, paths, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2 * len(paths)):
        name, res, kvh, kout = q.get(timeout=240)
        got[name] = (res, kvh, kout)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for name, path in paths.items():
        ref = _reference(path)
        res, kvh, kout = got[name]
        for a, b in zip(res, ref):
            assert a.shape == b.shape
            assert abs(a - b).max() < 1e-4, name
        assert got[f"follower-{name}"][0] == 3  # forward, embed, logits mirrored on rank 1
    assert got["qwen3-tied-kv1"][1] == 1 and got["qwen3-tied-kv1"][2] == 16  # replicated KV head
    assert got["llama-bias-oddvocab"][1] == 1  # 2 KV heads split over 2 ranks
