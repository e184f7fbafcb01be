#!/usr/bin/env bash
# Runs every test of easel: Rust unit and integration tests (real server over real
# sockets), then the interop suite with the real yjs / y-websocket JS client.
# Needs only the Rust toolchain and Node; installs the JS packages itself (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build"
cargo build --locked --bins

echo "== cargo test"
cargo test --locked --no-fail-fast

echo "== interop (yjs + y-websocket)"
(
  cd tests/interop
  npm ci --no-audit --no-fund --loglevel=error
  EASEL_BIN="$PWD/../../target/debug/easel" node --test --test-concurrency=2 test/
)
