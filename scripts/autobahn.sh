#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (its fuzzing client: RFC 6455 framing, pings, closes, UTF-8,
# limits, and RFC 7692 permessage-deflate) against easel's own WebSocket layer, through
# `examples/ws_echo.rs` (the server's upgrade, reader, writer and connection loop behind an
# echo handler). Not part of the test command: it downloads the testsuite and takes about
# ten minutes. Needs git and Python 3.11 or later with venv.
#
#   scripts/autobahn.sh            # every case
#   scripts/autobahn.sh '1.*' '12.1.*'   # some
#
# The testsuite itself is Python 2 and unmaintained; this uses a Python 3 port whose
# authors checked it case by case against the Python 2 original (AUTOBAHN_SRC to use
# another copy). Reports go to target/autobahn/reports/servers/index.html; the script
# exits non-zero when a case FAILED.
set -euo pipefail
cd "$(dirname "$0")/.."

src=${AUTOBAHN_SRC:-https://github.com/ricardo-valero/autobahn-testsuite}
rev=${AUTOBAHN_REV:-955b43dabd8adb947d3392fd980222ed382a9cc3}
work=target/autobahn
mkdir -p "$work"

if [ ! -d "$work/testsuite" ]; then
  git clone -q "$src" "$work/testsuite"
fi
git -C "$work/testsuite" checkout -q "$rev"

if [ ! -x "$work/venv/bin/wstest" ]; then
  python3 -m venv "$work/venv"
  # The port asks for Python 3.12 but runs on 3.11 (Debian 12's).
  "$work/venv/bin/pip" install -q --ignore-requires-python \
    "autobahn[twisted]>=26.7.1" "twisted[tls]>=26.4.0" "pyopenssl>=25.0" \
    "service-identity>=24.1" "jinja2>=3.1"
  "$work/venv/bin/pip" install -q --ignore-requires-python --no-deps -e "$work/testsuite"
fi

cargo build --locked --release --example ws_echo

port=${AUTOBAHN_PORT:-9001}
target/release/examples/ws_echo "127.0.0.1:$port" &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done

cases='["*"]'
if [ $# -gt 0 ]; then
  cases=$(printf '"%s",' "$@")
  cases="[${cases%,}]"
fi
cat > "$work/fuzzingclient.json" <<EOF
{
  "options": {"failByDrop": false},
  "outdir": "./reports/servers",
  "servers": [{"agent": "easel", "url": "ws://127.0.0.1:$port"}],
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF

cd "$work"
rm -rf reports
# The port writes one case's report (7.3.2) with a bytes value that json cannot encode;
# encode such values as text rather than lose the whole run's reports.
venv/bin/python - -m fuzzingclient -s fuzzingclient.json <<'EOF'
import json, sys
_dumps = json.dumps
def dumps(obj, **kw):
    kw.setdefault("default", lambda o: o.decode("latin-1") if isinstance(o, bytes) else repr(o))
    return _dumps(obj, **kw)
json.dumps = dumps
from autobahntestsuite.wstest import run
sys.exit(run())
EOF

python3 - <<'EOF'
import collections, json, sys
cases = json.load(open("reports/servers/index.json"))["easel"]
count = collections.Counter()
failed = []
for case, r in sorted(cases.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
    count[r["behavior"]] += 1
    if "FAILED" in (r["behavior"], r["behaviorClose"]):
        failed.append(f"{case}: {r['behavior']} / close {r['behaviorClose']}")
print(f"{len(cases)} cases:", ", ".join(f"{n} {b}" for b, n in sorted(count.items())))
print("report: target/autobahn/reports/servers/index.html")
for line in failed:
    print("FAILED", line)
sys.exit(1 if failed else 0)
EOF
