#!/usr/bin/env bash
# Start -> READY=1 (over a test-owned $NOTIFY_SOCKET) and resident memory 2 s later, idle, five times;
# the first start also creates the event log.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
BIN=$(release_binary payop-ipnd)
WORK=$(mktemp -d /tmp/payop-ipnd-startup.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/config.yaml" <<YAML
log_level: warning
server:
  listen: 127.0.0.1:${BASE_PORT:-18780}
admin:
  listen: 127.0.0.1:$(( ${BASE_PORT:-18780} + 1 ))
storage:
  path: $WORK/events.sqlite3
hooks:
  - name: demo
    command: [/bin/true]
    events: ["*"]
YAML
python3 - "$BIN" "$WORK" <<'PY'
import os, socket, subprocess, sys, time
binary, work = sys.argv[1], sys.argv[2]
path = os.path.join(work, "notify.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path); s.settimeout(10)
for i in range(5):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "serve", "--config", os.path.join(work, "config.yaml")],
                         env=dict(os.environ, NOTIFY_SOCKET=path), stderr=subprocess.DEVNULL)
    while "READY=1" not in s.recv(4096).decode():
        pass
    ready = (time.monotonic() - t0) * 1000
    time.sleep(2)
    rss = int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
    p.terminate(); p.wait()
    print(f"start -> READY=1: {ready:.0f} ms (target < 100), idle RSS: {rss:.1f} MB (target < 50)")
PY
