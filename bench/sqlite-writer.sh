#!/usr/bin/env bash
# The log writer's SQLite statements alone, on this machine's libsqlite3 (bench/sqlite-writer.c): CPU
# per IPN as the daemon ran them before 2026-11-30's SQLite round (SQLite's allocation statistics on,
# an answer's claims read by a grouped query, state checks written as lists), each of that round's
# three changes alone (statistics off, claims walked, checks as chains of `=`), and all three (the
# daemon now). The five are run in turn, ROUNDS times, in one run; medians and ratios printed.
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

CONFIGS=("1 grouped lists" "0 grouped lists" "1 walked lists" "1 grouped chains" "0 walked chains")
for round in $(seq "$ROUNDS"); do
    for config in "${CONFIGS[@]}"; do
        # shellcheck disable=SC2086
        echo "$config $("$WORK/sqlite-writer" $config "$IPNS" "$WORK")" >>"$WORK/results"
    done
done
python3 - "$WORK/results" "$IPNS" "$ROUNDS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
labels = {
    ("1", "grouped", "lists"): "before (statistics on, claims grouped, checks as lists)",
    ("0", "grouped", "lists"): "statistics off alone",
    ("1", "walked", "lists"): "claims walked alone",
    ("1", "grouped", "chains"): "checks as chains alone",
    ("0", "walked", "chains"): "all three (the daemon now)",
}
median = {}
print(f"the log writer's SQLite statements per IPN (ingest, answer, delivery), {sys.argv[2]} IPNs x {sys.argv[3]} rounds:")
for key, label in labels.items():
    values = [float(r[3]) for r in rows if tuple(r[:3]) == key]
    median[key] = statistics.median(values)
    ratio = median[key] / median[("1", "grouped", "lists")]
    print(f"  {label:58} {median[key]:6.2f} us  {ratio:.2f}x  (runs: {', '.join(f'{v:.2f}' for v in values)})")
PY
