"""Our decoder vs transformers on tiny random Llama / Llama-3-scaled / Qwen3 configs.

Tolerance: fp32, max |logit difference| < 1e-4 (logits are O(1); observed ~1e-6).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_dir, make_tiny_hf_model
from workers.models.attention import AttnMetadata
from workers.models.loader import load_model


pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen3"])
def pair(request, tmp_path_factory):
    d = make_tiny_hf_dir(tmp_path_factory.mktemp(request.param), request.param, seed=1, with_tokenizer=False)
    hf = make_tiny_hf_model(request.param, seed=1)
    ours = load_model(d, dtype="float32", device="cpu").model
    return request.param, hf, ours


def test_logits_match_transformers(pair):
    family, hf, ours = pair
    torch.manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (2, 100))  # 100 > original ctx 64 of the llama3 config
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL, family


def test_captured_layers_are_hf_hidden_states(pair):
    _, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 20))
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
        final, cap = ours.forward_hidden(ids, capture_layers=[0, 2])
    assert set(cap) == {0, 2}
    for i in (0, 2):
        assert (cap[i] - hs[i + 1]).abs().max().item() < TOL


def test_paged_forward_matches_full(pair):
    """Prefill 13 tokens then decode 3 more through a paged cache with shuffled block ids."""
    _, _, ours = pair
    cfg = ours.config
    bs, nb = 4, 16
    caches = [(torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim),
               torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    blocks = torch.tensor([7, 2, 11, 5, 9])
    ids = torch.randint(0, cfg.vocab_size, (16,))
    with torch.no_grad():
        ref = ours(ids[None])[0]  # [16, V]

        def run(lo, hi):
            pos = torch.arange(lo, hi)
            slots = blocks[pos // bs] * bs + pos % bs
            k = torch.arange(len(blocks) * bs)
            mask = (k[None, :] <= pos[:, None])[None, None]  # [1,1,T,K]
            meta = AttnMetadata(slots, blocks[None], None, None, mask, 1, hi - lo)
            h, _ = ours.forward_paged(ids[lo:hi], pos, caches, meta)
            return ours.logits(h)

        outs = [run(0, 13), run(13, 14), run(14, 16)]
    got = torch.cat(outs)
    assert (got - ref).abs().max().item() < TOL


def test_chunked_prefill_attention_matches_full(pair):
    """Long prefill chunks through the engine's step inputs: the first chunk is causal self-attention only, the
    later ones merge the cached prefix and their own tokens by log-sum-exp (attention.chunk_attention); decode
    steps after them use the masked paged path. All equal the full forward."""
    from workers.engine.runner import SeqSlice, build_step_inputs
    from workers.models.attention import CHUNK_SPLIT_MIN

    _, _, ours = pair
    cfg = ours.config
    bs, nb = 4, 128
    caches = [(torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim),
               torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    table = list(torch.randperm(nb)[:100].tolist())
    n = 2 * CHUNK_SPLIT_MIN + 30
    ids = torch.randint(0, cfg.vocab_size, (n,))
    with torch.no_grad():
        ref = ours(ids[None])[0]  # [n, V]
        outs = []
        cuts = [0, CHUNK_SPLIT_MIN + 7, 2 * CHUNK_SPLIT_MIN + 20, n - 1, n]  # two split chunks, a short one, a decode
        for lo, hi in zip(cuts, cuts[1:]):
            inp = build_step_inputs([SeqSlice(ids[lo:hi].tolist(), lo, table, list(range(hi - lo)))], bs, torch.device("cpu"),
                                    capture=False)
            assert inp.attn.seqs is not None and inp.attn.seqs[0].slot0 == -1  # a shuffled table: gathered
            h, _ = ours.forward_paged(inp.input_ids, inp.positions, caches, inp.attn)
            outs.append(ours.logits(h))
    assert (torch.cat(outs) - ref).abs().max().item() < TOL


def test_ragged_and_padded_attention_agree_on_a_mixed_step(pair):
    """One step mixing a long prefill chunk (prefix + own), a short prefill, a verify block and decodes, over
    contiguous and shuffled block tables: the CPU's per-sequence path equals the padded masked path."""
    from workers.engine.runner import SeqSlice, build_step_inputs
    from workers.models.attention import CHUNK_SPLIT_MIN

    _, _, ours = pair
    cfg = ours.config
    bs, nb = 4, 256
    torch.manual_seed(0)
    caches = [(torch.randn(nb, bs, cfg.num_key_value_heads, cfg.head_dim),
               torch.randn(nb, bs, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    shuffled = torch.randperm(nb)[:60].tolist()
    runs = [list(range(100, 160)), list(range(160, 200)), list(range(200, 240))]
    specs = [  # (n query tokens, start position, table)
        (CHUNK_SPLIT_MIN + 5, 30, shuffled), (7, 0, runs[0]), (8, 50, runs[1]), (1, 90, runs[2]), (1, 13, shuffled[30:])]
    slices = [SeqSlice(torch.randint(0, cfg.vocab_size, (n,)).tolist(), start, table, list(range(n)))
              for n, start, table in specs]
    out = {}
    with torch.no_grad():
        for ragged in (True, False):
            inp = build_step_inputs(slices, bs, torch.device("cpu"), capture=False, ragged=ragged)
            kv = [(k.clone(), v.clone()) for k, v in caches]
            h, _ = ours.forward_paged(inp.input_ids, inp.positions, kv, inp.attn)
            out[ragged] = ours.logits(h)
    seqs = build_step_inputs(slices, bs, torch.device("cpu"), capture=False).attn.seqs
    assert [s.slot0 >= 0 for s in seqs] == [False, True, True, True, False]
    assert (out[True] - out[False]).abs().max().item() < TOL
