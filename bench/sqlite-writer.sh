#!/usr/bin/env bash
# The log writer's SQLite statements alone, on this machine's libsqlite3 (bench/sqlite-writer.c): CPU
# per IPN with SQLite's allocation statistics on (its default, the daemon before 2026-11-30) and off
# (what `serve` sets), and with an answer's claims read by the grouped query (before) or by walking the
# event's copies (now). The four are run in turn, ROUNDS times, in one run; medians and ratios printed.
#
#   bench/sqlite-writer.sh [IPNS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IPNS=${1:-100000}
ROUNDS=${2:-5}

source bench/common.sh
install_missing gcc:gcc
WORK=$(mktemp -d /tmp/payop-ipnd-sqlite-writer.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
gcc -O2 -o "$WORK/sqlite-writer" bench/sqlite-writer.c -lsqlite3

CONFIGS=("1 grouped" "0 grouped" "1 walked" "0 walked")
for round in $(seq "$ROUNDS"); do
    for config in "${CONFIGS[@]}"; do
        # shellcheck disable=SC2086
        echo "$config $("$WORK/sqlite-writer" $config "$IPNS" "$WORK")" >>"$WORK/results"
    done
done
python3 - "$WORK/results" "$IPNS" "$ROUNDS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
median = {}
for memstatus, claims in [("1", "grouped"), ("0", "grouped"), ("1", "walked"), ("0", "walked")]:
    values = [float(r[2]) for r in rows if r[0] == memstatus and r[1] == claims]
    median[(memstatus, claims)] = statistics.median(values)
    print(f"  statistics {'on ' if memstatus == '1' else 'off'}, claims {claims:7}: {median[(memstatus, claims)]:6.2f} us per IPN"
          f"  (runs: {', '.join(f'{v:.2f}' for v in values)})")
base = median[("1", "grouped")]
print(f"the writer's SQLite statements, {sys.argv[2]} IPNs x {sys.argv[3]} rounds, CPU per IPN against statistics on + grouped claims:")
for key, label in [(("0", "grouped"), "statistics off"), (("1", "walked"), "claims walked"), (("0", "walked"), "both (the daemon now)")]:
    print(f"  {label}: {median[key] / base:.2f}x")
PY
