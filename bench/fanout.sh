#!/usr/bin/env bash
# End to end, with the Payop simulator as Payop on loopback:
#  1. latency: IPN posted -> hook process started, p50 and p99 (IPNs sent one at a time);
#  2. throughput: events/s fully handled (IPN in, durably logged, verified against the simulator,
#     /bin/true hook run and recorded) against Debian's `webhook` running /bin/true per request,
#     both driven by wrk -t2 -c16 for the same time in the same run, and both counted until their
#     last /bin/true has ended (webhook answers before it runs the command, and under this load fails
#     to start many: its request rate and its failures are printed too; see bench/common.sh).
#
#   bench/fanout.sh [SECONDS] [LATENCY_SAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
SAMPLES=${2:-300}
BASE=${BASE_PORT:-18580}

source bench/common.sh
install_missing wrk:wrk webhook:webhook gcc:gcc
SIMULATOR=$(release_binary payop-simulator)
DAEMON_BIN=$(release_binary payop-ipnd)
WORK=$(mktemp -d /tmp/payop-ipnd-fanout.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT

gcc -O2 -DBENCH_LOG="\"$WORK/started.log\"" -o "$WORK/hook-started" bench/hook-started.c
echo "bench-jwt" >"$WORK/jwt"; chmod 600 "$WORK/jwt"
"$SIMULATOR" --port $((BASE + 1)) --jwt-file "$WORK/jwt" --accept-unknown >/dev/null &
PIDS+=($!)
wait_port $((BASE + 1))

start_daemon() { # hook-command db-name
    verifying_config "$WORK/config.yaml" $BASE "$WORK/$2" $((BASE + 1)) "$WORK/jwt" "$1"
    "$DAEMON_BIN" serve --config "$WORK/config.yaml" 2>>"$WORK/daemon.log" &
    DAEMON=$!
    PIDS+=($DAEMON)
    wait_port $BASE
}

# 1. Latency, one IPN at a time.
start_daemon "$WORK/hook-started" latency.sqlite3
python3 - "$BASE" "$SAMPLES" "$WORK/started.log" <<'PY'
import http.client, json, os, sys, time
port, samples, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port)
sent = {}
for n in range(samples):
    tx = f"latency-{os.getpid()}-{n}"
    body = json.dumps({"invoice": {"id": f"inv-{tx}", "status": 1, "txid": tx},
                       "transaction": {"id": tx, "state": 2, "order": {"id": f"o-{n}"}, "error": {"message": "", "code": ""}}})
    sent[tx] = time.time_ns()
    conn.request("POST", "/payop/ipn", body, {"Content-Type": "application/json"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
    time.sleep(0.02)
deadline = time.time() + 30
started = {}
while time.time() < deadline and len(started) < samples:
    time.sleep(0.1)
    started = dict(line.split() for line in open(log) if line.strip()) if os.path.exists(log) else {}
lat = sorted((int(started[tx]) - t) / 1e6 for tx, t in sent.items() if tx in started)
if len(lat) < samples: print(f"only {len(lat)} of {samples} hooks started"); sys.exit(1)
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"IPN posted -> hook process started ({samples} IPNs, one at a time): p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms  (target p50 < 3 ms, p99 < 10 ms)")
PY
kill $DAEMON; wait $DAEMON 2>/dev/null || true

# 2. Throughput: payop-ipnd end to end against webhook.
start_daemon /bin/true throughput.sqlite3
START=$(date +%s.%N)
wrk -t2 -c16 -d"${DURATION}s" -s bench/unique-ipn.lua "http://127.0.0.1:$BASE" | grep '^RESULT' >"$WORK/wrk-daemon.txt"
python3 - "$WORK/throughput.sqlite3" "$START" "$WORK/wrk-daemon.txt" >"$WORK/daemon-result.txt" <<'PY'
import sqlite3, sys, time
db, start, wrk = sys.argv[1], float(sys.argv[2]), open(sys.argv[3]).read()
accepted = int(wrk.split("requests=")[1].split()[0])
deadline = time.time() + 300
while True:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    pending = c.execute("SELECT count(*) FROM events WHERE state = 'received'").fetchone()[0]
    pending += c.execute("SELECT count(*) FROM deliveries WHERE state IN ('pending','running')").fetchone()[0]
    done, last = c.execute("SELECT count(*), max(delivered_at) FROM deliveries WHERE state = 'delivered'").fetchone()
    events = c.execute("SELECT count(*) FROM events").fetchone()[0]
    c.close()
    if pending == 0 or time.time() > deadline: break
    time.sleep(0.2)
elapsed = last / 1000 - start
print(f"{events} {done} {elapsed:.3f} {done / elapsed:.0f} {accepted}")
PY
read -r EVENTS DELIVERED ELAPSED E2E_RATE ACCEPTED <"$WORK/daemon-result.txt"
# Requests to Payop per event, split by how they were asked (the daemon's own counter).
REQUESTS=$(python3 -c '
import re, sys, urllib.request
counts = {}
for line in urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics").read().decode().splitlines():
    m = re.match(r"payop_ipnd_payop_requests_total\{(.*)\} ([0-9.e+]+)$", line.strip())
    if m:
        labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(1)))
        key = labels["endpoint"] + " " + labels["asked"].replace("_", " ")
        counts[key] = counts.get(key, 0) + float(m.group(2))
events = max(1, int(sys.argv[1]))
total = sum(counts.values())
parts = ", ".join(f"{k} {v / events:.3f}" for k, v in sorted(counts.items()))
print(f"{total / events:.3f} ({parts})")
' "$EVENTS" $((BASE + 2)))
kill $DAEMON; wait $DAEMON 2>/dev/null || true

start_webhook "$WORK/webhook.log" $((BASE + 3))
wait_port $((BASE + 3))
START=$(date +%s.%N)
WEBHOOK=$(BENCH_PATH=/hooks/payop wrk -t2 -c16 -d"${DURATION}s" -s bench/unique-ipn.lua "http://127.0.0.1:$((BASE + 3))" | grep '^RESULT')
WEBHOOK_RATE=$(echo "$WEBHOOK" | sed 's/.*rps=\([0-9]*\).*/\1/')
WEBHOOK_ANSWERED=$(echo "$WEBHOOK" | sed 's/.*requests=\([0-9]*\).*/\1/')
read -r WEBHOOK_ENDED WEBHOOK_FAILED WEBHOOK_ELAPSED < <(webhook_runs_ended "$WORK/webhook.log" "$START" "$WEBHOOK_ANSWERED")
WEBHOOK_RUNS=$((WEBHOOK_ENDED - WEBHOOK_FAILED))
WEBHOOK_E2E=$(python3 -c "print(round($WEBHOOK_RUNS / $WEBHOOK_ELAPSED))")

echo "end to end over ${DURATION}s of wrk -t2 -c16 (unique IPNs, simulator as Payop, hook /bin/true):"
echo "  payop-ipnd: $ACCEPTED IPNs answered 200, $EVENTS events, $DELIVERED hooks run and recorded in ${ELAPSED}s: $E2E_RATE events/s"
echo "  requests to Payop per event: $REQUESTS"
echo "  webhook:    $WEBHOOK_ANSWERED requests answered 200 ($WEBHOOK_RATE/s); of their commands $WEBHOOK_FAILED never ran (webhook's own errors), $WEBHOOK_RUNS /bin/true runs ended within ${WEBHOOK_ELAPSED}s: $WEBHOOK_E2E runs/s (nothing logged, verified or retried)"
python3 -c "print(f'  ratio payop-ipnd / webhook, runs per second: {$E2E_RATE / max(1, $WEBHOOK_E2E):.2f}x  (target >= 1x; against its answers per second: {$E2E_RATE / $WEBHOOK_RATE:.2f}x)')"
