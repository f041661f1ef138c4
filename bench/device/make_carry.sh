#!/bin/bash
# Build .devcarry/site for the device machine (it has torch, transformers and peft, no package registry,
# and another Python): keel's pure-Python dependencies the tests there need, copied from .venv, and a
# stand-in for google-re2 (a compiled wheel for this machine's Python) over Python's `re`, used there only.
# Then: run(command="bash bench/device/cpu_paths.sh", carry=[".devcarry"]). .devcarry must be git-ignored
# (add "/.devcarry/" to .git/info/exclude).
set -euo pipefail
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .devcarry && mkdir -p .devcarry/site
for p in gguf pytest _pytest pluggy iniconfig py.py packaging; do cp -r "$SP/$p" .devcarry/site/; done
cat > .devcarry/site/re2.py <<'PY'
"""Device machine only: Python's re in place of google-re2 for the adapter tests' plain patterns."""
import re

error = re.error


class Options:
    log_errors = True


def compile(pattern, options=None):
    return re.compile(pattern)
PY
du -sh .devcarry
