#!/usr/bin/env bash
# The PostgreSQL event log's tests against a real server: the store-protocol suite on both backends,
# two daemons sharing one log (concurrent ingest, claims, leases), migrations, durability checks.
# Installs Debian's postgresql when its server programs are missing; the tests start a throwaway
# cluster (initdb + pg_ctl in a temporary folder, as the postgres user when run as root, on a free
# port of 127.0.0.1, fsync on) and stop and delete it when they end.
#
#   scripts/pg-test.sh                      every PostgreSQL suite
#   scripts/pg-test.sh StoreProtocolTests   one of them (a swift test --filter)
#   PAYOP_IPND_TEST_POSTGRES=postgres://user:pw@host/db scripts/pg-test.sh   an existing server instead
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

export PAYOP_IPND_TEST_POSTGRES=${PAYOP_IPND_TEST_POSTGRES:-start}
filter=${1:-"StoreProtocolTests|Postgres|StorageCopy|TwoDaemon"}

# Only one Swift build or test run at a time on a shared machine: held for the run and the cleanup,
# so no other run's cluster is mistaken for a leftover.
exec 9>/tmp/payop-build.lock
flock 9
status=0
swift test --filter "$filter" || status=$?

# A test process killed before its exit handler ran leaves its cluster behind: stop and remove it.
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
for data in "${TMPDIR:-/tmp}"/payop-ipnd-pg-*/data; do
    [ -d "$data" ] || continue
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
    else
        "$bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$(dirname "$data")"
done
exit $status
