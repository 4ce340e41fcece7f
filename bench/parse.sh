#!/usr/bin/env bash
# The IPN body parser alone: the whole value tree (baseline), the fields the notification parser reads,
# and the check alone, on the bench's body, on Payop's sample IPNs and on a body near the 64 KiB limit;
# ns per body, in one run.
#
#   bench/parse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/payop-ipnd-parse.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cp bench/parse.swift "$WORK/main.swift"  # top-level code lives in main.swift
# The parser and the notification parser's selection, compiled on their own (no package build).
swiftc -O -o "$WORK/parse" Sources/PayopIPND/Support/StrictJSON.swift Sources/PayopIPND/Ingress/Notification.swift \
    Sources/PayopIPND/Ingress/NotificationParser.swift "$WORK/main.swift"
"$WORK/parse" bench large Tests/PayopIPNDTests/Samples/*.json
