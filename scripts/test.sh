#!/usr/bin/env bash
# Runs every test of easel: Rust unit and integration tests (real server over real
# sockets), the interop suite with the real yjs / y-websocket JS client, and the demo page
# in a headless browser. Needs only the Rust toolchain and Node; installs the JS packages
# itself (npm ci) and, as root or with password-less sudo, Debian's chromium when it is
# missing, and Debian's redis-server the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

# The cluster-mode tests start their own redis-server (on a free loopback port, in a
# temporary directory; never the system service): Debian's, installed here when missing,
# as root or with password-less sudo like chromium below. The `rediss://` test makes its
# certificates with the openssl command, installed the same way.
echo "== redis-server and openssl (for the cluster-mode tests)"
missing=()
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then missing+=(redis-server); fi
if ! command -v openssl >/dev/null; then missing+=(openssl); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else
    echo "the cluster-mode tests need Debian's ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  # Only the binaries are needed: the package's service is neither used nor required.
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --workspace: the server (root package) and bench/ (load generator, baseline fan-out
# server, the workload library's unit tests). Both land in target/debug/.
echo "== cargo build"
cargo build --locked --workspace --bins

echo "== cargo test"
cargo test --locked --workspace --no-fail-fast

echo "== load generator smoke (a few seconds: exact counts, zero loss, convergence)"
target/debug/easel-loadgen --server-bin target/debug/easel --scenario smoke

echo "== interop (yjs + y-websocket)"
(
  cd tests/interop
  npm ci --no-audit --no-fund --loglevel=error
  EASEL_BIN="$PWD/../../target/debug/easel" node --test --test-concurrency=2 test/
)

echo "== browser (the demo page in Debian's chromium)"
if [ ! -x /usr/bin/chromium ]; then
  # As root (CI), or with sudo that needs no password; otherwise say what to run.
  if [ "$(id -u)" = 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else
    echo "the browser test needs Debian's chromium: sudo apt-get install chromium" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
(
  cd tests/browser
  npm ci --no-audit --no-fund --loglevel=error
  EASEL_BIN="$PWD/../../target/debug/easel" node --test
)
