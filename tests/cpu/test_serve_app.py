"""The official openai SDK against a real Ray Serve deployment of the app (mock engine, two replicas that
accept differently), one Serve instance for the module: chat / completions, streamed and not, headers,
sessions, errors, metrics, and the session registry surviving a restart of the ingress actor."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from orchestrator.app import start_local, stop_local
from tests.helpers.serving import mock_config, wait_healthy

pytestmark = pytest.mark.ray
MODEL = "specfleet-demo"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = mock_config(tmp, http={"port": 18731}, ray={"num_cpus": 2},
                      replicas=[{"count": 1, "mock": {"acceptance": 0.9, "step_ms": 2}},
                                {"count": 1, "drafter": "none", "mock": {"step_ms": 2}}])
    url = start_local(cfg)
    wait_healthy(url)
    yield url, cfg
    stop_local()


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key="key-a", base_url=server[0] + "/v1", max_retries=0)


def test_chat_and_completions_plain_and_streamed(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=24, temperature=0.7, top_p=0.9,
        seed=3)
    resp = raw.parse()
    assert raw.headers["x-specfleet-replica"] and raw.headers["x-specfleet-route"]
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 24
    assert resp.choices[0].message.content

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 24 and len(text) == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    comp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10)
    assert comp.usage.prompt_tokens == len("Once upon") and len(comp.choices[0].text) == 10
    parts = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, stream=True))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text  # greedy: same text
    stopped = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, stop=[comp.choices[0].text[3:5]])
    assert stopped.choices[0].text == comp.choices[0].text[:3] and stopped.choices[0].finish_reason == "stop"


def test_models_and_errors(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="session"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-session-id": "sess_missing"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="bad", base_url=server[0] + "/v1", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{oops",
                   headers={"authorization": "Bearer key-a", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_sessions_route_and_survive_an_ingress_restart(client, server):
    import ray

    url = server[0]
    auth = {"authorization": "Bearer key-a"}
    sid = httpx.post(url + "/v1/sessions", json={"role": "coder", "team": "t1"}, headers=auth).json()["id"]
    seen = set()
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=32, extra_headers={"x-session-id": sid})
        seen.add(raw.headers["x-specfleet-replica"])
    s = httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).json()
    assert s["turns"] == 4 and s["completion_tokens"] == 128 and set(s["acceptance_by_replica"]) == seen
    assert all(t["route"] for t in s["replica_history"])
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers={"authorization": "Bearer key-b"}).status_code == 404

    metrics = httpx.get(url + "/metrics").text
    assert "specfleet_route_decisions_total" in metrics and "specfleet_accepted_length_bucket" in metrics
    assert "specfleet_kv_free_tokens" in metrics

    # kill the ingress actor: Serve starts a new one, which reopens the SQLite registry
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"]]
    assert names, "no ingress actor found"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    deadline, got = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        try:
            got = httpx.get(f"{url}/v1/sessions/{sid}", headers=auth, timeout=5)
            if got.status_code == 200 and ray.util.list_named_actors(all_namespaces=True):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert got is not None and got.status_code == 200 and got.json()["turns"] == 4
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=8,
                                       extra_headers={"x-session-id": sid})
    assert r.usage.completion_tokens == 8


def test_wedged_engine_fails_health_checks_and_is_replaced(server):
    """Last in the module: redeploys the app with one replica whose engine hangs on its 2nd request."""
    from ray import serve

    from orchestrator.app import build_app

    url, cfg = server
    data = cfg.model_dump(mode="json")
    data.update(health_check_period_s=1.0, health_check_timeout_s=5.0, drain_timeout_s=2.0,
                replicas=[{"count": 1, "mock": {"step_ms": 1, "wedge_after_requests": 1}}])
    wedged = type(cfg).model_validate(data)
    serve.run(build_app(wedged.to_args()), name=cfg.ray.app_name, route_prefix="/")
    wait_healthy(url)
    c = openai.OpenAI(api_key="key-a", base_url=url + "/v1", max_retries=0, timeout=120)
    first = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                                        max_tokens=8)
    t0 = time.monotonic()
    # the replica wedges on this one: Serve's health check (3 failures, 1 s apart) replaces it and the
    # ingress re-runs the non-streamed request on the new replica
    second = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "b"}],
                                                         max_tokens=8)
    assert second.parse().usage.completion_tokens == 8 and time.monotonic() - t0 < 60
    assert second.headers["x-specfleet-replica"] != first.headers["x-specfleet-replica"]
