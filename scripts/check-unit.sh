#!/usr/bin/env bash
# Checks systemd/payop-ipnd.service: `systemd-analyze verify` must be clean and the offline security
# exposure 2.0 or lower. Both work without a running systemd.
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT=systemd/payop-ipnd.service
MAX_EXPOSURE=2.0

if ! command -v systemd-analyze >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# verify also checks that ExecStart's program exists. Where payop-ipnd is not installed (CI, a
# developer's machine), verify a copy whose ExecStart names an executable that does exist; every
# other line is checked as written.
BINARY=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$UNIT")
if [ -x "$BINARY" ]; then
    cp "$UNIT" "$WORK/payop-ipnd.service"
else
    sed "s|^ExecStart=$BINARY|ExecStart=$(command -v true)|" "$UNIT" >"$WORK/payop-ipnd.service"
fi
OUT=$(systemd-analyze verify "$WORK/payop-ipnd.service" 2>&1) || { echo "$OUT"; echo "systemd-analyze verify failed"; exit 1; }
if [ -n "$OUT" ]; then echo "$OUT"; echo "systemd-analyze verify printed warnings"; exit 1; fi
echo "systemd-analyze verify $UNIT: clean"

EXPOSURE=$(systemd-analyze security --offline=yes "$UNIT" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$EXPOSURE" ] || { echo "could not read the exposure level"; exit 1; }
echo "systemd-analyze security --offline=yes $UNIT: exposure $EXPOSURE (at most $MAX_EXPOSURE)"
python3 -c "import sys; sys.exit(0 if float('$EXPOSURE') <= float('$MAX_EXPOSURE') else 1)" || {
    echo "exposure $EXPOSURE is above $MAX_EXPOSURE"; exit 1; }
