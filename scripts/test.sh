#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: the Rust unit and
# integration tests (real TLS sockets on 127.0.0.1), then the JavaScript
# client tests, the Node/Python interop test and the headless Chromium test,
# all against the real gateway binary that `cargo test` builds.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test-deps.sh

echo "== cargo test"
cargo test --locked

echo "== node --test (web/test)"
(cd web && WSGATE_BIN="$PWD/../target/debug/wsgate" node --test --test-concurrency=1 test/*.test.mjs)
