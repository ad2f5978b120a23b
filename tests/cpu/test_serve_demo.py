"""The demo pair (SmolLM2-135M-Instruct + the bundled DFlash drafter) behind a real Serve deployment, through
the official openai SDK: chat plain and streamed, a session with acceptance stats."""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.demo, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from orchestrator.app import start_local, stop_local
    from orchestrator.config import ServeConfig
    from workers import hub

    hub.ensure_model("smollm2")  # cached after the first pull
    tmp = tmp_path_factory.mktemp("demo")
    cfg = ServeConfig.model_validate({
        "http": {"port": 18751}, "ray": {"num_cpus": 2},
        "persistence": {"sqlite_path": str(tmp / "s.sqlite")}, "auth": {"keys_env": None},
        "model": {"max_model_len": 1024}, "replicas": [{"kv_cache_bytes": 64 << 20, "max_num_seqs": 4}],
    })
    url = start_local(cfg)
    yield url, (hub.default_drafter_path() / "config.json").is_file()
    stop_local()


def test_demo_pair_answers_through_the_sdk(server):
    url, has_drafter = server
    sid = httpx.post(url + "/v1/sessions", json={"role": "assistant", "team": "demo"}).json()["id"]
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    raw = c.chat.completions.with_raw_response.create(model="specfleet-demo", messages=msgs, max_tokens=24,
                                                      extra_headers={"x-session-id": sid})
    resp = raw.parse()
    assert "4" in resp.choices[0].message.content
    assert raw.headers["x-specfleet-spec"].startswith("block=" if has_drafter else "off")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="specfleet-demo", messages=msgs, max_tokens=24, stream=True, extra_headers={"x-session-id": sid}))
    assert streamed == resp.choices[0].message.content  # greedy: the same text either way
    s = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert s["turns"] == 2 and s["completion_tokens"] == 2 * resp.usage.completion_tokens
    if has_drafter:
        assert s["tau"] > 1.0
