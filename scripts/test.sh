#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite.
# The tests start their own embedded Redis and Postgres unless REDIS_URL and
# DATABASE_URL point at running servers.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing and this is not root; browser tests will be skipped" >&2
  fi
fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/chatpipe-runtime}
mkdir -p -m 700 "$XDG_RUNTIME_DIR"
exec .venv/bin/python -m pytest "$@"
