#!/usr/bin/env bash
# Payop replaying a backlog: TOTAL distinct checkout IPNs posted as fast as 64 clients can, then the
# time until every one has been verified against the simulator (as Payop, on loopback) and its hook
# (/bin/true) has run and been recorded. The same TOTAL requests sent to Debian's `webhook` running
# /bin/true each, in the same run, for comparison: its /bin/true runs per second until the last has
# ended (it answers before it runs the command, and under load fails to start some: the time its
# answers took and its failures are printed too; see bench/common.sh). Also payop-ipnd's CPU and context switches per event
# over the burst (from /proc), split between its writer thread, its hook reapers, its event loops and the
# rest (Swift tasks).
#
#   bench/burst.sh [TOTAL] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-50000}
CONNECTIONS=${2:-64}
BASE=${BASE_PORT:-18680}

source bench/common.sh
install_missing wrk:wrk webhook:webhook ab:apache2-utils
SIMULATOR=$(release_binary payop-simulator)
DAEMON_BIN=$(release_binary payop-ipnd)
WORK=$(mktemp -d /tmp/payop-ipnd-burst.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT

echo "bench-jwt" >"$WORK/jwt"; chmod 600 "$WORK/jwt"
"$SIMULATOR" --port $((BASE + 1)) --jwt-file "$WORK/jwt" --accept-unknown >/dev/null &
PIDS+=($!)
verifying_config "$WORK/config.yaml" $BASE "$WORK/events.sqlite3" $((BASE + 1)) "$WORK/jwt" /bin/true
"$DAEMON_BIN" serve --config "$WORK/config.yaml" 2>>"$WORK/daemon.log" &
DAEMON=$!
PIDS+=($DAEMON)
start_webhook "$WORK/webhook.log" $((BASE + 3))
wait_port $BASE; wait_port $((BASE + 1)); wait_port $((BASE + 3))

START=$(date +%s.%N)
# wrk has no request count: it runs until every IPN is in the log, then is stopped (SIGINT: it reports).
BENCH_PATH=/payop/ipn wrk -t2 -c"$CONNECTIONS" -d600s -s bench/unique-ipn.lua "http://127.0.0.1:$BASE" \
    >"$WORK/wrk.txt" &
WRK=$!
python3 - "$WORK/events.sqlite3" "$TOTAL" <<'PY'
import sqlite3, sys, time
db, total = sys.argv[1], int(sys.argv[2])
while True:
    time.sleep(0.05)
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        n = c.execute("SELECT count(*) FROM receipts").fetchone()[0]
        c.close()
    except sqlite3.Error:
        continue
    if n >= total: break
PY
kill -INT $WRK; wait $WRK || true
POSTED=$(date +%s.%N)
DAEMON_WRK=$(grep '^RESULT' "$WORK/wrk.txt")
python3 - "$WORK/events.sqlite3" "$START" "$POSTED" "$DAEMON_WRK" >"$WORK/daemon.txt" <<'PY'
import sqlite3, sys, time
db, start, posted, wrk = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
answered = int(wrk.split("requests=")[1].split()[0])
deadline = time.time() + 900
while True:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    waiting = c.execute("SELECT count(*) FROM events WHERE state = 'received'").fetchone()[0]
    waiting += c.execute("SELECT count(*) FROM deliveries WHERE state IN ('pending','running')").fetchone()[0]
    events = c.execute("SELECT count(*) FROM events").fetchone()[0]
    done, last = c.execute("SELECT count(*), max(delivered_at) FROM deliveries WHERE state = 'delivered'").fetchone()
    c.close()
    if (waiting == 0 and done >= events) or time.time() > deadline: break
    time.sleep(0.2)
print(f"{answered} {done} {posted - start:.2f} {last / 1000 - start:.2f}")
PY
read -r ANSWERED DONE POST_S ALL_S <"$WORK/daemon.txt"
# The daemon's CPU and context switches over the whole burst per event, and its threads' shares (from
# /proc, now that all is hooked: the writer thread, the hook reapers, the event loops, and the rest,
# mostly Swift tasks).
CPU_LINE=$(python3 - "$DAEMON" "$DONE" <<'PY'
import glob, os, sys
pid, events = sys.argv[1], max(1, int(sys.argv[2]))
tick = os.sysconf("SC_CLK_TCK")
def cpu(stat_path):
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick
try:
    total = cpu(f"/proc/{pid}/stat")
except OSError:
    print("  payop-ipnd's CPU over the burst: not read (the daemon is gone)")
    sys.exit(0)
def switches(status_path):
    counts = [int(line.split()[1]) for line in open(status_path) if "ctxt_switches" in line]
    return sum(counts)
names = ["writer thread", "hook reaper", "event loops", "Swift tasks and the rest"]
groups = dict.fromkeys(names, 0.0)
woken = dict.fromkeys(names, 0)
for task in glob.glob(f"/proc/{pid}/task/*"):
    try:
        name = open(f"{task}/comm").read().strip()
        used = cpu(f"{task}/stat")
        switched = switches(f"{task}/status")
    except OSError:
        continue
    if name == "ipnd-log-writer": group = "writer thread"
    elif name.startswith("ipnd-hook"): group = "hook reaper"
    elif name.startswith("NIO-"): group = "event loops"
    else: group = "Swift tasks and the rest"
    groups[group] += used
    woken[group] += switched
# The rest's CPU is the process's total less the named threads', so that threads which ended count too
# (their switches cannot be read any more).
groups["Swift tasks and the rest"] = total - sum(groups[n] for n in names[:3])
parts = ", ".join(f"{k} {v * 1e6 / events:.0f}" for k, v in groups.items())
print(f"  payop-ipnd's CPU over the burst: {total * 1e6 / events:.0f} us per event ({parts})")
# Context switches of its threads (voluntary and not, from /proc; a thread that ended is not counted).
parts = ", ".join(f"{k} {v / events:.2f}" for k, v in woken.items())
print(f"  payop-ipnd's context switches over the burst: {sum(woken.values()) / events:.2f} per event ({parts})")
PY
)
# webhook: the same count of requests, 64 at a time over keep-alive connections as wrk's (ApacheBench has
# a request count; without -k it would open a connection per request, a cost the daemon does not pay).
python3 -c 'print("{\"transaction\":{\"id\":\"x\",\"state\":2}}")' >"$WORK/body.json"
W_START=$(date +%s.%N)
W_S=$(ab -k -q -n "$TOTAL" -c "$CONNECTIONS" -p "$WORK/body.json" -T application/json \
    "http://127.0.0.1:$((BASE + 3))/hooks/payop" | sed -n 's/^Time taken for tests: *\([0-9.]*\).*/\1/p')
read -r W_ENDED W_FAILED W_END < <(webhook_runs_ended "$WORK/webhook.log" "$W_START" "$TOTAL")
W_RUNS=$((W_ENDED - W_FAILED))

echo "burst of $TOTAL distinct IPNs from $CONNECTIONS connections ($(nproc) cores, simulator as Payop, hook /bin/true):"
echo "  payop-ipnd: $ANSWERED answered 200 in ${POST_S}s; all $DONE verified and hooked ${ALL_S}s after the first"
echo "$CPU_LINE"
echo "  webhook:    $TOTAL requests answered 200 in ${W_S}s; of their commands $W_FAILED never ran (webhook's own errors), $W_RUNS /bin/true runs ended within ${W_END}s of ab's start"
# Per event: wrk posts a few more IPNs than TOTAL before it is stopped, and each one is handled.
python3 -c "print(f'  ratio (events handled per second over the backlog), payop-ipnd / webhook: {$DONE / $ALL_S / (max(1, $W_RUNS) / $W_END):.2f}x  (1x: as fast as webhook; against its answers alone {$DONE / $ALL_S / ($TOTAL / $W_S):.2f}x)')"
