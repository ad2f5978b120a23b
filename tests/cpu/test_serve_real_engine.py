"""The Serve app over the real engine (tiny random target + tiny DFlash drafter, CPU): a tensor-parallel
replica (tp=2, one Ray actor per rank in the replica's placement group) serves the same greedy tokens as
an in-process engine, through the OpenAI completions API with a token-id prompt."""
from __future__ import annotations

import asyncio

import openai
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROMPT = [5, 9, 17, 33, 40]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter
    from workers.models.dflash import save_drafter
    from workers.models.loader import load_model

    tmp = tmp_path_factory.mktemp("tiny")
    target = make_tiny_hf_dir(tmp / "target", "llama")
    save_drafter(tiny_drafter(load_model(target, "float32", "cpu").config, num_layers=1, block_size=8),
                 tmp / "drafter")
    return tmp, str(target), str(tmp / "drafter")


def _reference(target: str, drafter: str) -> str:
    from cluster.runtime.replica_group import ReplicaGroup
    from workers.engine.config import EngineConfig
    from workers.engine.params import SamplingParams

    async def run():
        g = await ReplicaGroup(EngineConfig(model=target, drafter=drafter, device="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                                            max_num_seqs=4), tp=1).start()
        try:
            outs = [o async for o in g.generate("ref", PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))]
            assert sum(len(o.new_token_ids) for o in outs) == 12
            return "".join(o.text for o in outs)
        finally:
            await g.shutdown()

    return asyncio.run(run())


def test_tp2_replica_serves_the_reference_tokens(pair):
    from orchestrator.app import start_local, stop_local
    from orchestrator.config import ServeConfig

    tmp, target, drafter = pair
    want = _reference(target, drafter)
    cfg = ServeConfig.model_validate({
        "model": {"target": target, "drafter": drafter, "block_size": 8, "device": "cpu", "dtype": "float32"},
        "replicas": [{"count": 1, "tp": 2, "kv_cache_bytes": 8 << 20, "max_num_seqs": 4}],
        "persistence": {"sqlite_path": str(tmp / "s.sqlite")}, "auth": {"keys_env": None},
        "http": {"port": 18761}, "ray": {"num_cpus": 4},
    })
    url = start_local(cfg)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        raw = c.completions.with_raw_response.create(model="specfleet-demo", prompt=PROMPT, max_tokens=12,
                                                     extra_body={"ignore_eos": True})
        out = raw.parse()
        assert out.usage.completion_tokens == 12
        assert raw.headers["x-specfleet-spec"].startswith("block=")
        assert out.choices[0].text == want  # greedy: the same tokens (and text deltas) as in-process TP=1
    finally:
        stop_local()
