#!/usr/bin/env bash
# kill -9 the daemon while thousands of distinct IPNs arrive from many clients and its hook runs,
# restart it, and check that every IPN answered 200 is in the log and that its hook ran (at least
# once). Legacy V1 IPNs are used: they are verified on arrival, so no Payop is needed. Exits non-zero
# on any loss.
#
#   scripts/crash-test.sh [TOTAL_IPNS] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-6000}
CLIENTS=${2:-32}
PORT=${PORT:-18480}

source bench/common.sh
BIN=$(release_binary payop-ipnd)
WORK=$(mktemp -d /tmp/payop-ipnd-crash.XXXXXX)
DAEMON=
trap '[ -n "$DAEMON" ] && kill -9 $DAEMON 2>/dev/null; rm -rf "$WORK"' EXIT

echo "crash-test-secret" >"$WORK/secret"; chmod 600 "$WORK/secret"
cat >"$WORK/hook" <<HOOK
#!/bin/sh
sleep 0.01
echo "\$PAYOP_ORDER_ID" >>"$WORK/hooked.txt"
HOOK
chmod +x "$WORK/hook"
cat >"$WORK/config.yaml" <<YAML
log_level: warning
server:
  listen: 127.0.0.1:$PORT
  allowed_sources: any
admin:
  listen: 127.0.0.1:$((PORT + 1))
storage:
  path: $WORK/events.sqlite3
payop:
  secret_key_file: $WORK/secret
delivery:
  retry_initial_seconds: 1
hooks:
  - name: record
    command: [$WORK/hook]
    events: ["*"]
YAML

start_daemon() {
    "$BIN" serve --config "$WORK/config.yaml" 2>>"$WORK/daemon.log" &
    DAEMON=$!
    wait_port $PORT || { cat "$WORK/daemon.log"; exit 1; }
}

start_daemon
# Kill the daemon when about a third of the IPNs have been answered.
python3 - "$PORT" "$TOTAL" "$CLIENTS" "$WORK/acked.txt" "$DAEMON" <<'PY' &
import hashlib, http.client, json, os, signal, sys, threading
port, total, clients, acked_path, daemon = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
lock = threading.Lock()
acked, counter, killed = [], [0], [False]
def next_id():
    with lock:
        counter[0] += 1
        return counter[0] if counter[0] <= total else None
def worker():
    conn = None
    while (n := next_id()) is not None:
        order = f"crash-{os.getpid()}-{n}"
        signed = f"12.5000:EUR:{order}:success:crash-test-secret"
        body = json.dumps({"orderId": order, "amount": "12.50", "currency": "EUR", "status": "success",
                           "signature": hashlib.sha256(signed.encode()).hexdigest()})
        try:
            conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/payop/ipn", body, {"Content-Type": "application/json"})
            resp = conn.getresponse(); resp.read()
            if resp.status == 200:
                with lock:
                    acked.append(order)
                    if not killed[0] and len(acked) >= total // 3:
                        killed[0] = True
                        os.kill(daemon, signal.SIGKILL)
        except Exception:
            conn = None
threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
with open(acked_path, "w") as f: f.write("\n".join(acked) + "\n")
PY
LOADER=$!
wait $LOADER
wait $DAEMON 2>/dev/null || true
ACKED=$(grep -c . "$WORK/acked.txt" || true)
HOOKED_AT_KILL=$(sort -u "$WORK/hooked.txt" 2>/dev/null | grep -c . || true)

start_daemon
# Let the restarted daemon finish every delivery (interrupted ones run again).
for _ in $(seq 1 600); do
    LEFT=$("$BIN" deliveries list --config "$WORK/config.yaml" --limit 100000000 --json \
        | python3 -c 'import json,sys; print(sum(d["state"] in ("pending", "running") for d in json.load(sys.stdin)))')
    [ "$LEFT" -eq 0 ] && break
    sleep 0.2
done
"$BIN" events list --config "$WORK/config.yaml" --limit 100000000 --json \
    | python3 -c 'import json,sys; [print(e["order_id"]) for e in json.load(sys.stdin)]' | sort >"$WORK/logged.txt"
kill -TERM $DAEMON; wait $DAEMON || true; DAEMON=
sort -u "$WORK/acked.txt" | grep . >"$WORK/acked.sorted" || true
sort -u "$WORK/hooked.txt" >"$WORK/hooked.sorted"
LOST=$(comm -23 "$WORK/acked.sorted" "$WORK/logged.txt" | wc -l)
UNHOOKED=$(comm -23 "$WORK/acked.sorted" "$WORK/hooked.sorted" | wc -l)
LOGGED=$(grep -c . "$WORK/logged.txt" || true)
RUNS=$(grep -c . "$WORK/hooked.txt" || true)
echo "sent: $TOTAL  clients: $CLIENTS  answered 200 before kill -9: $ACKED  in the log after restart: $LOGGED  lost: $LOST"
echo "hooks: $HOOKED_AT_KILL events hooked before the kill; after restart $(grep -c . "$WORK/hooked.sorted") of them, in $RUNS runs; answered but never hooked: $UNHOOKED"
if [ "$LOST" -ne 0 ] || [ "$UNHOOKED" -ne 0 ]; then
    echo "LOST IPNs that were answered 200:"; comm -23 "$WORK/acked.sorted" "$WORK/logged.txt" | head
    echo "answered but never hooked:"; comm -23 "$WORK/acked.sorted" "$WORK/hooked.sorted" | head
    exit 1
fi
if [ "$ACKED" -eq 0 ]; then echo "no IPN was answered: the test proved nothing"; exit 1; fi
echo "ok: every IPN answered 200 survived kill -9, and its hook ran"
