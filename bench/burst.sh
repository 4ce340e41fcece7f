#!/usr/bin/env bash
# Payop replaying a backlog: TOTAL distinct checkout IPNs posted as fast as 64 clients can, then the
# time until every one has been verified against the simulator (as Payop, on loopback) and its hook
# (/bin/true) has run and been recorded. The same TOTAL requests sent to Debian's `webhook` running
# /bin/true each, in the same run, for comparison.
#
#   bench/burst.sh [TOTAL] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-50000}
CONNECTIONS=${2:-64}
BASE=${BASE_PORT:-18680}

source bench/common.sh
install_missing wrk:wrk webhook:webhook
release_binary payop-simulator >/dev/null
BINDIR=$(dirname "$(release_binary payop-ipnd)")
WORK=$(mktemp -d /tmp/payop-ipnd-burst.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT

echo "bench-jwt" >"$WORK/jwt"; chmod 600 "$WORK/jwt"
"$BINDIR/payop-simulator" --port $((BASE + 1)) --jwt-file "$WORK/jwt" --accept-unknown >/dev/null &
PIDS+=($!)
cat >"$WORK/config.yaml" <<YAML
log_level: warning
server:
  listen: 127.0.0.1:$BASE
  allowed_sources: any
admin:
  listen: 127.0.0.1:$((BASE + 2))
storage:
  path: $WORK/events.sqlite3
payop:
  api_base_url: http://127.0.0.1:$((BASE + 1))
  jwt_file: $WORK/jwt
hooks:
  - name: bench
    command: [/bin/true]
    events: ["checkout.*"]
YAML
"$BINDIR/payop-ipnd" serve --config "$WORK/config.yaml" 2>>"$WORK/daemon.log" &
DAEMON=$!
PIDS+=($DAEMON)
cat >"$WORK/hooks.json" <<JSON
[{"id": "payop", "execute-command": "/bin/true", "http-methods": ["POST"]}]
JSON
webhook -hooks "$WORK/hooks.json" -ip 127.0.0.1 -port $((BASE + 3)) >"$WORK/webhook.log" 2>&1 &
PIDS+=($!)
wait_port $BASE; wait_port $((BASE + 1)); wait_port $((BASE + 3))

burst() { # port path
    BENCH_TOTAL=$TOTAL BENCH_THREADS=2 BENCH_PATH=$2 wrk -t2 -c"$CONNECTIONS" -d600s -s bench/unique-ipn.lua \
        "http://127.0.0.1:$1" | grep '^RESULT'
}

START=$(date +%s.%N)
DAEMON_WRK=$(burst $BASE /payop/ipn)
POSTED=$(date +%s.%N)
python3 - "$WORK/events.sqlite3" "$START" "$POSTED" "$TOTAL" "$DAEMON_WRK" >"$WORK/daemon.txt" <<'PY'
import sqlite3, sys, time
db, start, posted, total, wrk = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
answered = int(wrk.split("requests=")[1].split()[0])
deadline = time.time() + 900
while True:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    waiting = c.execute("SELECT count(*) FROM events WHERE state = 'received'").fetchone()[0]
    waiting += c.execute("SELECT count(*) FROM deliveries WHERE state IN ('pending','running')").fetchone()[0]
    done, last = c.execute("SELECT count(*), max(delivered_at) FROM deliveries WHERE state = 'delivered'").fetchone()
    c.close()
    if (waiting == 0 and done >= answered) or time.time() > deadline: break
    time.sleep(0.2)
print(f"{answered} {done} {posted - start:.2f} {last / 1000 - start:.2f}")
PY
read -r ANSWERED DONE POST_S ALL_S <"$WORK/daemon.txt"
W_START=$(date +%s.%N)
WEBHOOK_WRK=$(burst $((BASE + 3)) /hooks/payop)
W_END=$(date +%s.%N)
W_ANSWERED=$(echo "$WEBHOOK_WRK" | sed 's/.*requests=\([0-9]*\).*/\1/')

echo "burst of $TOTAL distinct IPNs from $CONNECTIONS connections ($(nproc) cores, simulator as Payop, hook /bin/true):"
echo "  payop-ipnd: $ANSWERED answered 200 in ${POST_S}s; all $DONE verified and hooked ${ALL_S}s after the first"
python3 -c "print(f'  webhook:    $W_ANSWERED requests (each a /bin/true run) in {$W_END - $W_START:.2f}s')"
python3 -c "print(f'  ratio (time to handle the backlog), webhook / payop-ipnd: {($W_END - $W_START) / $ALL_S:.2f}x  (1x: as fast as webhook)')"
