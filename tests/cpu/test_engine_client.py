"""The three engines the serving layer runs behind one protocol: in-process, TP replica group, mock."""
from __future__ import annotations

import pytest

from cluster.runtime.replica_group import ReplicaGroup
from orchestrator.mock_engine import MockEngine
from tests.helpers.tiny import tiny_engine
from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.client import EngineClient
from workers.engine.config import EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


async def test_every_engine_is_an_engine_client(tmp_path):
    eng, _ = tiny_engine(tmp_path / "m", drafter_block=None)
    aeng = AsyncLLMEngine(eng)
    try:
        for e in (aeng, ReplicaGroup(EngineConfig(model=str(tmp_path / "m")), tp=2, in_process=False), MockEngine()):
            assert isinstance(e, EngineClient), type(e).__name__
    finally:
        await aeng.shutdown()
    assert not isinstance(object(), EngineClient)
