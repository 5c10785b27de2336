#!/usr/bin/env bash
# Create .venv, install chatpipe with its test extras, and pull the models.
# Safe to run again: every step skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml to the CPU build 2.13.0.
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/chatpipe models pull
