#!/usr/bin/env bash
# The README's first command: serve the built-in model and answer one real request over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
.venv/bin/keel serve --port "$PORT" > /tmp/keel-demo.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat /tmp/keel-demo.log; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "SmolLM2-135M-Instruct",
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 40, "temperature": 0}' | .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
print(r["choices"][0]["message"]["content"])
print("(usage:", r["usage"], "fingerprint:", r["system_fingerprint"] + ")")'
