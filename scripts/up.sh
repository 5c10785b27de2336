#!/usr/bin/env bash
# Install chatpipe and its models, then start the whole system on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/chatpipe-runtime}
mkdir -p -m 700 "$XDG_RUNTIME_DIR"
exec .venv/bin/chatpipe up "$@"
