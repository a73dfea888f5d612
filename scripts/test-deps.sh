#!/usr/bin/env bash
# Installs what the tests need beyond Rust, each only when it is missing:
# Debian's Chromium (browser test), HAProxy and nginx with its stream
# module (deploy/ files and the HAProxy integration test), systemd-analyze
# (the unit file), redis-server (cluster tests), the npm packages in web/ (ws, playwright-core), and
# Python's `websockets` and `kubernetes-validate` (with PyYAML) into
# .ci/cache/python.
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

# Debian packages the tests run, keyed by the file that proves each is there.
missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# The cluster tests start their own redis-server on a free port.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  # The tests start their own instances on loopback ports of their own.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -f web/node_modules/ws/package.json ] || [ ! -f web/node_modules/playwright-core/package.json ]; then
  echo "== installing npm packages (web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! PYTHONPATH=.ci/cache/python python3 -c 'import websockets' >/dev/null 2>&1; then
  echo "== installing python websockets (.ci/cache/python)"
  python3 -m pip install --quiet --disable-pip-version-check --target .ci/cache/python 'websockets==17.4'
fi

if ! PYTHONPATH=.ci/cache/python python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "== installing python kubernetes-validate (.ci/cache/python)"
  python3 -m pip install --quiet --disable-pip-version-check --target .ci/cache/python 'kubernetes-validate==1.37.0'
fi
