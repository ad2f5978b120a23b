"""Planner: memory arithmetic checked by hand, refusals, layouts on the DGX B300 presets."""
from __future__ import annotations

import json

import pytest

from cluster.planning.planner import PlanError, Workload, budget_replica, plan, weight_shard_bytes
from cluster.planning.presets import PRESETS, default_drafter, drafter_from_config, model_from_config, resolve_model
from cluster.planning.roofline import experts_touched, replica_throughput, target_step
from cluster.planning.topology import GiB, get_node


def test_preset_param_counts_match_published_totals():
    # published: Qwen3-8B 8.2B, Qwen3-32B 32.8B, Llama-3.1-70B 70.6B, gpt-oss-120b 116.8B total / 5.1B active
    assert PRESETS["qwen3-8b"].total_params == 8_190_726_144
    assert round(PRESETS["qwen3-32b"].total_params / 1e9, 1) == 32.8
    assert round(PRESETS["llama-3.1-70b"].total_params / 1e9, 1) == 70.6
    oss = PRESETS["gpt-oss-120b"]
    assert round(oss.total_params / 1e9, 1) == 116.8 and round(oss.active_params / 1e9, 1) == 5.1
    # MXFP4 experts (4.25 bits) + bf16 rest: ~65 GB, the size of the published checkpoint
    assert 64e9 < oss.weight_total_bytes < 66e9


def test_memory_arithmetic_by_hand_qwen3_8b_on_one_h100():
    """Qwen3-8B bf16, TP1, no drafter, 4 sequences, util 0.9, prefill chunk 8192 tokens.

    total 80e9; headroom 8e9; weights 8,190,726,144 params x 2 B = 16,381,452,288
    activations: 1.5 GiB reserve (1,610,612,736) + 8192 tokens x (4*4096 + 4096 + 2*1024 + 2*12288) x 2 B
                 (771,751,936) + 4 rows x 151,936 x 4 B x 2 (4,861,952) = 2,387,226,624
    KV per token: 36 layers x 2 (K,V) x 8 heads x 128 x 2 B = 147,456
    pool: (80e9 - 8e9 - 16,381,452,288 - 2,387,226,624) / 147,456 = 360,998 -> multiple of 16: 360,992
    """
    m, node = PRESETS["qwen3-8b"], get_node("h100")
    w = Workload(concurrency=4, max_model_len=32768, speculative=False, gpu_memory_utilization=0.9,
                 max_num_batched_tokens=8192)
    (b,), tokens = budget_replica(m, None, node, 1, [0], 4, w, 32768)
    assert b.headroom == pytest.approx(8e9)
    assert b.weights == 16_381_452_288
    assert b.activations == 2_387_226_624
    assert tokens == 360_992
    assert b.kv_pool == 360_992 * 147_456
    assert b.drafter == 0
    assert b.allocated + b.headroom + b.free == pytest.approx(80e9)
    assert 0 <= b.free < 16 * 147_456  # only the rounding to whole KV blocks is left over


def test_tp_shards_weights_and_drafter_sits_on_rank0():
    m = PRESETS["qwen3-8b"]
    d = default_drafter(m)
    assert weight_shard_bytes(m, 2) == pytest.approx((m.weight_total_bytes - (m.norm_params * 2)) / 2 + m.norm_params * 2)
    w = Workload(concurrency=16)
    budgets, tokens = budget_replica(m, d, get_node("dgx-b300"), 2, [2, 3], 16, w, m.max_position)
    r0, r1 = budgets
    # rank 0: drafter weights + drafter context KV of the pool's tokens (embedding / lm_head are borrowed)
    extra = d.weight_total_bytes + tokens * d.kv_bytes_per_token
    assert r0.drafter == pytest.approx(extra)
    assert r1.drafter == 0 and r1.free == pytest.approx(r0.free + extra)
    assert r0.kv_pool == r1.kv_pool  # same tokens on every rank, each with its half of the KV heads


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dgx_b300_plans_fit_every_gpu(name):
    m = PRESETS[name]
    p = plan(get_node("dgx-b300"), m, default_drafter(m))
    used = sorted(g for r in p.replicas for g in r.gpu_ids)
    assert len(used) == len(set(used)) and all(0 <= g < 8 for g in used)
    for r in p.replicas:
        assert r.drafter_gpu == r.gpu_ids[0]
        assert r.kv_pool_tokens >= m.max_position
        for b in r.memory:
            assert b.free >= -1 and b.allocated <= b.total * 0.9 + 1
    assert p.tokens_per_s == max([p.tokens_per_s] + [a.tokens_per_s for a in p.alternatives])
    assert p.explanation[0].startswith(f"chosen {p.layout}")
    json.dumps(p.to_dict())  # JSON-safe


def test_refuses_model_too_large():
    with pytest.raises(PlanError, match="model too large for node"):
        plan(get_node("h100"), PRESETS["llama-3.1-70b"])
    # fits once the node has enough GPUs
    assert plan(get_node("dgx-h100"), PRESETS["llama-3.1-70b"]).chosen.tp >= 2


def test_refuses_context_too_long():
    with pytest.raises(PlanError, match="context too long"):
        plan(get_node("dgx-b300"), PRESETS["qwen3-8b"], workload=Workload(max_model_len=100_000))
    # within the positions but beyond the KV pool of every layout (16 GB weights on 80 GB)
    big = model_from_config({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                             "num_hidden_layers": 36, "vocab_size": 151936, "intermediate_size": 12288,
                             "max_position_embeddings": 1_000_000}, name="mha-8b")
    with pytest.raises(PlanError, match="context too long"):
        plan(get_node("h100"), big, workload=Workload(max_model_len=900_000, concurrency=1))


def test_refuses_bad_workload():
    with pytest.raises(PlanError, match="concurrency"):
        plan(get_node("dgx-b300"), PRESETS["qwen3-8b"], workload=Workload(concurrency=0))
    with pytest.raises(PlanError, match="tau"):
        plan(get_node("dgx-b300"), PRESETS["qwen3-8b"], workload=Workload(tau=40))
    with pytest.raises(PlanError, match="avg context need"):
        plan(get_node("h100"), PRESETS["qwen3-8b"], workload=Workload(concurrency=400, avg_context=32768))


def test_roofline_terms():
    assert experts_touched(128, 4, 1) == pytest.approx(4)
    assert experts_touched(128, 4, 10_000) == pytest.approx(128)
    m, node = PRESETS["qwen3-8b"], get_node("dgx-b300")
    s1, s2 = target_step(m, node, 1, 8, 1, 4096), target_step(m, node, 2, 8, 1, 4096)
    assert s1.comm_s == 0 and s2.comm_s > 0 and s2.bytes_read < s1.bytes_read
    assert s1.bound == "memory"  # batch-8 decode reads weights, it does not saturate the tensor cores
    thr = replica_throughput(m, node, 1, 8, 4096, default_drafter(m), 16, tau=6.0)
    assert thr.mode == "spec" and thr.spec_tokens_per_s > thr.ar_tokens_per_s
    thr1 = replica_throughput(m, node, 1, 8, 4096, default_drafter(m), 16, tau=1.0)
    assert thr1.mode == "ar"  # speculation that accepts nothing never pays


def test_model_and_drafter_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    m = resolve_model(str(tmp_path))
    assert round(m.total_params / 1e6, 1) == 134.5  # SmolLM2-135M
    p = plan(get_node("h100"), m, workload=Workload(concurrency=8, speculative=False))
    assert p.layout == "1xTP1"
    d = tmp_path / "drafter"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["DFlashDraftModel"], "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 2, "intermediate_size": 1536,
        "vocab_size": 49152, "block_size": 8, "num_target_layers": 30,
        "dflash_config": {"mask_token_id": 3, "target_layer_ids": [1, 15, 28]}}))
    ds = drafter_from_config(str(d))
    assert (ds.num_layers, ds.num_features, ds.block_size) == (2, 3, 8)
    with pytest.raises(ValueError, match="not a DFlash checkpoint"):
        drafter_from_config(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")


def test_plan_cli_json_and_errors(capsys):
    from orchestrator.cli import main

    assert main(["plan", "--node", "dgx-b300", "--model", "qwen3-8b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] in {"8xTP1", "4xTP2", "2xTP4", "1xTP8"} and out["explanation"]
    assert main(["plan", "--node", "dgx-b300", "--model", "gpt-oss-120b"]) == 0
    assert "CHOSEN" in capsys.readouterr().out
    assert main(["plan", "--node", "h100", "--model", "llama-3.1-70b"]) == 1
    assert "model too large" in capsys.readouterr().err
    assert main(["plan", "--node", "nope", "--model", "qwen3-8b"]) == 1
    # gpt-oss-120b fits one 80 GB H100 in its native MXFP4, not once upcast to bf16
    assert main(["plan", "--node", "h100", "--model", "gpt-oss-120b", "--max-model-len", "32768",
                 "--concurrency", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "1xTP1"
    assert main(["plan", "--node", "h100", "--model", "gpt-oss-120b", "--max-model-len", "32768",
                 "--dtype", "bfloat16"]) == 1
    assert "233.6 GB of weights" in capsys.readouterr().err


# ------------------------------------------------------------------ several nodes
def test_two_dgx_b300_nodes_plan_eight_tp2_replicas_four_per_node():
    m = PRESETS["qwen3-32b"]
    p = plan(get_node("dgx-b300"), m, default_drafter(m), Workload(concurrency=128), num_nodes=2)
    assert (p.layout, p.num_nodes, len(p.replicas)) == ("4xTP2", 2, 8)
    assert p.cluster_layout == "2 nodes x 4xTP2 = 8 replicas"
    assert [r.index for r in p.replicas] == list(range(8))
    for k in (0, 1):
        on = [r for r in p.replicas if r.node == k]
        assert len(on) == 4 and sum(r.max_seqs for r in on) == 64
        gpus = sorted(g for r in on for g in r.gpu_ids)
        assert gpus == list(range(8))  # each node's 8 GPUs, each once: no TP group spans two nodes
        for r in on:
            assert [b.gpu for b in r.memory] == r.gpu_ids and r.drafter_gpu == r.gpu_ids[0]
    # one node at half the concurrency is the same layout with the same per-replica budgets
    one = plan(get_node("dgx-b300"), m, default_drafter(m), Workload(concurrency=64))
    assert one.layout == "4xTP2" and p.tokens_per_s == pytest.approx(2 * one.tokens_per_s)
    assert [r.kv_pool_tokens for r in p.replicas] == [r.kv_pool_tokens for r in one.replicas] * 2
    text = "\n".join(p.explanation)
    assert p.explanation[0].startswith("chosen 4xTP2")
    assert "8 replicas of TP2, 4 on every node" in text and "64 per node" in text
    assert "node 1: replica 4: GPUs 0+1" in text and "ConnectX-8" in text and "ends at the node" in text
    d = p.to_dict()
    assert (d["num_nodes"], d["num_replicas"], d["node_concurrency"]) == (2, 8, [64, 64])
    assert [r["node"] for r in d["replicas"]] == [0] * 4 + [1] * 4
    json.dumps(d)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("nodes", [2, 3])
def test_no_tp_group_spans_nodes_and_uneven_shares(name, nodes):
    m, node = PRESETS[name], get_node("dgx-b300")
    p = plan(node, m, default_drafter(m), Workload(concurrency=131), num_nodes=nodes)
    assert len(p.replicas) == nodes * p.chosen.num_replicas
    shares = [sum(r.max_seqs for r in p.replicas if r.node == k) for k in range(nodes)]
    assert sum(shares) == 131 and max(shares) - min(shares) <= 1
    for k in range(nodes):
        gpus = [g for r in p.replicas if r.node == k for g in r.gpu_ids]
        assert len(gpus) == len(set(gpus)) and all(0 <= g < node.num_gpus for g in gpus)
    assert all(r.tp <= node.num_gpus for r in p.replicas)


def test_multi_node_refusals():
    with pytest.raises(PlanError, match="never spans nodes"):  # more nodes do not make a model fit
        plan(get_node("h100"), PRESETS["llama-3.1-70b"], num_nodes=4)
    with pytest.raises(PlanError, match="less than the 4 nodes"):
        plan(get_node("dgx-b300"), PRESETS["qwen3-8b"], workload=Workload(concurrency=2), num_nodes=4)
    with pytest.raises(PlanError, match="nodes must be >= 1"):
        plan(get_node("dgx-b300"), PRESETS["qwen3-8b"], num_nodes=0)


def test_plan_cli_nodes(capsys):
    import yaml

    from orchestrator.cli import main

    args = ["plan", "--node", "dgx-b300", "--nodes", "2", "--model", "qwen3-32b", "--concurrency", "128"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["cluster_layout"], out["num_replicas"]) == ("2 nodes x 4xTP2 = 8 replicas", 8)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 nodes x 8 GPUs" in text and "tok/s (cluster)" in text and "CHOSEN" in text
    assert "│ 0, 1 │" in text  # identical nodes share the memory rows
    assert main(args + ["--helm-values"]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values["gpuWorkers"] == {"replicas": 2, "gpusPerNode": 8}
    assert values["serve"]["replicas"][0]["count"] == 8 and values["serve"]["replicas"][0]["tp"] == 2
    assert main(["plan", "--nodes", "3", "--concurrency", "2", "--model", "qwen3-8b"]) == 1
    assert "less than the 3 nodes" in capsys.readouterr().err
