#!/usr/bin/env bash
# Installs what the non-Rust tests need, each only when it is missing:
# Debian's Chromium (browser test), redis-server (cluster tests), the npm packages in web/ (ws,
# playwright-core) and Python's `websockets` into .ci/cache/python.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1
  fi
}

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The cluster tests start their own redis-server on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -f web/node_modules/ws/package.json ] || [ ! -f web/node_modules/playwright-core/package.json ]; then
  echo "== installing npm packages (web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! PYTHONPATH=.ci/cache/python python3 -c 'import websockets' >/dev/null 2>&1; then
  echo "== installing python websockets (.ci/cache/python)"
  python3 -m pip install --quiet --disable-pip-version-check --target .ci/cache/python 'websockets==17.4'
fi
