#!/usr/bin/env bash
# Durable IPN ingest against nginx's bare `return 200` and Debian's `webhook` daemon running /bin/true,
# in the same run, on this machine: wrk -t2 -c16 -d10s, a unique IPN body per request.
#
#   bench/ingest.sh [SECONDS] [CONNECTIONS]                        the SQLite log
#   bench/ingest.sh --backend postgresql [SECONDS] [CONNECTIONS]   a PostgreSQL log on this machine
#                                                                  (a throwaway cluster), one daemon and
#                                                                  then two sharing it
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=sqlite
if [ "${1:-}" = "--backend" ]; then BACKEND=$2; shift 2; fi
case $BACKEND in sqlite|postgresql) ;; *) echo "--backend is sqlite or postgresql"; exit 2 ;; esac
DURATION=${1:-10}
CONNECTIONS=${2:-16}
BASE=${BASE_PORT:-18380}

source bench/common.sh
install_missing wrk:wrk nginx:nginx-light webhook:webhook
BIN=$(release_binary payop-ipnd)
WORK=$(mktemp -d /tmp/payop-ipnd-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    [ "$BACKEND" = postgresql ] && stop_postgres "$WORK/pg"
    rm -rf "$WORK"
}
trap cleanup EXIT


# nginx: the ceiling of an HTTP server on this machine.
mkdir -p "$WORK/nginx/logs"
cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes auto;
daemon off;
error_log $WORK/nginx/logs/error.log;
pid $WORK/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx;
    server { listen 127.0.0.1:$((BASE + 1)); location / { return 200; } }
}
CONF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
PIDS+=($!)

# Debian's webhook: a fork+exec of /bin/true per request.
cat >"$WORK/hooks.json" <<JSON
[{"id": "payop", "execute-command": "/bin/true", "http-methods": ["POST"]}]
JSON
webhook -hooks "$WORK/hooks.json" -ip 127.0.0.1 -port $((BASE + 2)) >"$WORK/webhook.log" 2>&1 &
PIDS+=($!)

# payop-ipnd: SQLite with synchronous=FULL and group commit, or PostgreSQL with synchronous_commit=on.
if [ "$BACKEND" = postgresql ]; then
    start_postgres "$WORK/pg" $((BASE + 9))
    STORAGE="  backend: postgresql
  url: postgres://postgres@127.0.0.1:$((BASE + 9))/payop?sslmode=disable
  pool_size: 16"
else
    STORAGE="  path: $WORK/events.sqlite3"
fi
daemon_config() { # FILE IPN_PORT ADMIN_PORT NODE
    cat >"$1" <<YAML
log_level: warning
server:
  listen: 127.0.0.1:$2
  allowed_sources: any
admin:
  listen: 127.0.0.1:$3
storage:
$STORAGE
YAML
    [ "$BACKEND" = postgresql ] && echo "  node_id: $4" >>"$1"
    return 0
}
daemon_config "$WORK/config.yaml" $BASE $((BASE + 3)) bench-a
"$BIN" serve --config "$WORK/config.yaml" 2>"$WORK/daemon.log" &
DAEMON=$!
PIDS+=($DAEMON)

wait_port $BASE; wait_port $((BASE + 1)); wait_port $((BASE + 2))

run() { # name port path
    local out
    out=$(BENCH_PATH=$3 wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s bench/unique-ipn.lua "http://127.0.0.1:$2" | grep '^RESULT')
    echo "$1 $out"
}

echo "wrk -t2 -c$CONNECTIONS -d${DURATION}s, unique IPN bodies; $(nproc) cores"
R_NGINX=$(run nginx $((BASE + 1)) /payop/ipn)
cpu_ticks() { awk '{print $14 + $15}' /proc/$DAEMON/stat; }
# Context switches of the daemon's threads, per thread: "tid voluntary involuntary". A voluntary one is
# a thread waiting (for another to hand it work, for fsync); an involuntary one is preemption.
switches() {
    for status in /proc/$DAEMON/task/*/status; do
        awk '/^Pid:/ {t = $2} /^voluntary_ctxt_switches/ {v = $2} /^nonvoluntary_ctxt_switches/ {n = $2}
             END {if (t) print t, v, n}' "$status" 2>/dev/null || true
    done
}
T0=$(cpu_ticks); switches >"$WORK/switches-0"
R_DAEMON=$(run payop-ipnd $BASE /payop/ipn)
T1=$(cpu_ticks); switches >"$WORK/switches-1"
# Over the run, thread by thread (a thread started meanwhile counts from 0; one that ended is not seen).
SWITCHES=$(awk 'NR == FNR {v[$1] = $2; n[$1] = $3; next} {dv += $2 - v[$1]; dn += $3 - n[$1]} END {print dv, dn}' \
    "$WORK/switches-0" "$WORK/switches-1")
RSS_KB=$(awk '/VmRSS/ {print $2}' /proc/$DAEMON/status)
R_TWO=""
if [ "$BACKEND" = postgresql ]; then
    # A second daemon on the same database; wrk against both at once, half the connections each.
    daemon_config "$WORK/config-b.yaml" $((BASE + 5)) $((BASE + 6)) bench-b
    "$BIN" serve --config "$WORK/config-b.yaml" 2>"$WORK/daemon-b.log" &
    PIDS+=($!)
    wait_port $((BASE + 5))
    HALF=$(( (CONNECTIONS + 1) / 2 ))
    BENCH_PATH=/payop/ipn wrk -t1 -c$HALF -d"${DURATION}s" -s bench/unique-ipn.lua "http://127.0.0.1:$BASE" \
        | grep '^RESULT' >"$WORK/two-a" &
    A=$!
    BENCH_PATH=/payop/ipn wrk -t1 -c$HALF -d"${DURATION}s" -s bench/unique-ipn.lua "http://127.0.0.1:$((BASE + 5))" \
        | grep '^RESULT' >"$WORK/two-b"
    wait $A
    R_TWO="$(cat "$WORK/two-a") | $(cat "$WORK/two-b")"
fi
# webhook last: it keeps forking /bin/true for a while after wrk stops, which would slow what follows.
R_WEBHOOK=$(run webhook $((BASE + 2)) /hooks/payop)
EVENTS=$("$BIN" events list --config "$WORK/config.yaml" --limit 100000000 --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')

python3 - "$R_NGINX" "$R_DAEMON" "$R_WEBHOOK" "$EVENTS" "$RSS_KB" "$((T1 - T0))" "$(getconf CLK_TCK)" "$BACKEND" "$R_TWO" "$SWITCHES" <<'PY'
import sys
def parse(line):
    name, _, rest = line.partition(" RESULT ")
    return name, dict(kv.split("=") for kv in rest.split())
rows = [parse(l) for l in sys.argv[1:4]]
events, rss = int(sys.argv[4]), int(sys.argv[5])
cpu_seconds = int(sys.argv[6]) / int(sys.argv[7])
base = {n: float(r["rps"]) for n, r in rows}
print(f"{'server':<12}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
for n, r in rows:
    print(f"{n:<12}{float(r['rps']):>10.0f}{int(r['p50_us'])/1000:>9.2f}{int(r['p99_us'])/1000:>9.2f}{r['errors']:>8}")
d = base["payop-ipnd"]
print(f"payop-ipnd / nginx:   {d / base['nginx']:.2f}x  (target >= 0.33x)")
print(f"payop-ipnd / webhook: {d / base['webhook']:.2f}x  (target >= 3x)")
p99 = int(dict(rows)["payop-ipnd"]["p99_us"]) / 1000
print(f"payop-ipnd p99: {p99:.2f} ms (target < 10 ms); events in the log: {events}; RSS after the run: {rss / 1024:.1f} MB")
answered = int(dict(rows)["payop-ipnd"]["requests"])
print(f"payop-ipnd CPU per durable IPN: {cpu_seconds / answered * 1e6:.0f} us (user + system over the run; target <= 40 us)")
voluntary, involuntary = (int(x) for x in sys.argv[10].split())
print(f"payop-ipnd context switches per durable IPN: {(voluntary + involuntary) / answered:.2f} "
      f"({voluntary / answered:.2f} voluntary: a thread waiting; the rest preempted)")
backend, two = sys.argv[8], sys.argv[9]
print(f"log: {backend}")
if two:
    halves = [dict(kv.split("=") for kv in part.strip().removeprefix("RESULT ").split()) for part in two.split("|")]
    total = sum(float(h["rps"]) for h in halves)
    errors = sum(int(h["errors"]) for h in halves)
    print(f"two daemons sharing the log: {total:.0f} req/s ({errors} errors): "
          f"{total / base['nginx']:.2f}x nginx, {total / base['webhook']:.2f}x webhook, {total / d:.2f}x one daemon")
PY
