#!/usr/bin/env bash
# The README's first command: serve the built-in model and answer one real request over HTTP.
# PORT=9000 bash scripts/demo.sh to use another port.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/"; then
  echo "demo: something already answers on port $PORT; run again with PORT=<a free port>" >&2
  exit 1
fi
LOG=$(mktemp -t keel-demo.XXXXXX.log)
.venv/bin/keel serve --port "$PORT" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
echo "demo: starting keel serve on port $PORT (log: $LOG)"
for _ in $(seq 240); do
  kill -0 $SERVER 2>/dev/null || { echo "demo: keel serve stopped:" >&2; cat "$LOG" >&2; exit 1; }
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 0.5
done
echo "demo: asking the model a question"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "SmolLM2-135M-Instruct",
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 40, "temperature": 0}' | .venv/bin/python -c '
import json, sys
raw = sys.stdin.read()
try:
    r = json.loads(raw)
    print(r["choices"][0]["message"]["content"])
    print("(usage:", r["usage"], "fingerprint:", r["system_fingerprint"] + ")")
except (ValueError, KeyError, IndexError):
    sys.exit(f"demo: unexpected answer: {raw[:500]}")'
