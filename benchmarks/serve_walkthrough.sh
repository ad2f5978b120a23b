#!/bin/bash
# README's first command on the embedded default, the README's examples, then spec decisions from /metrics
cd "$(dirname "$0")/.." # run from a shell where specfleet is installed
echo "start $(date -u +%H:%M:%S) load $(cat /proc/loadavg)"
specfleet serve > ${LOG:-/tmp/specfleet_walkthrough.log} 2>&1 &
SP=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8000/health >/dev/null && break; sleep 2; done
echo "ready $(date -u +%H:%M:%S)"
curl -s http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model": "specfleet-demo", "messages": [{"role": "user", "content": "What is 2+2?"}]}' -D - | grep -i "x-specfleet\|content"
python - <<'PY'
import httpx, openai
base = "http://127.0.0.1:8000"
client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
for role, prompts in {"coder": ["Write a Python add function.", "Now add type hints and a docstring.", "Write a function that reverses a string."],
                      "planner": ["Plan the steps to build a todo web app.", "Break step 2 into tasks."],
                      "assistant": ["What is 12*7?", "Explain what a hash map is."]}.items():
    sid = httpx.post(f"{base}/v1/sessions", json={"role": role, "team": "t1"}).json()["id"]
    msgs = []
    for p in prompts:
        msgs.append({"role": "user", "content": p})
        raw = client.chat.completions.with_raw_response.create(model="specfleet-demo", messages=msgs, max_tokens=128,
                                                               extra_headers={"x-session-id": sid})
        out = raw.parse().choices[0].message.content
        msgs.append({"role": "assistant", "content": out})
        print(role, raw.headers["x-specfleet-spec"], raw.headers["x-specfleet-route"], repr(out[:60]))
    print(httpx.get(f"{base}/v1/sessions/{sid}").json())
PY
curl -s http://127.0.0.1:8000/metrics | grep -E "^specfleet_spec_decisions_total|^spec_decisions_total|spec_decisions"
kill $SP; wait $SP
echo "end $(date -u +%H:%M:%S) load $(cat /proc/loadavg)"
