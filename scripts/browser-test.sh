#!/usr/bin/env bash
# Browser tests of the admin console: Playwright for Python driving Debian's chromium (no browser
# download) against daemons started with the standalone Payop simulator (browser-tests/).
# Saves docs/screenshots/overview.png and docs/screenshots/event.png.
#
#   scripts/browser-test.sh [PYTEST ARGS...]     e.g. -k replay
set -euo pipefail
cd "$(dirname "$0")/.."

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 PYTHONDONTWRITEBYTECODE=1
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ ! -x "$CHROMIUM" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! python3 -c 'import playwright.sync_api, pytest' 2>/dev/null; then
    python3 -m pip install -q playwright pytest
fi

# Only one Swift build at a time on a shared machine: the lock is a no-op when nobody else builds.
build() { if command -v flock >/dev/null; then flock /tmp/payop-build.lock "$@"; else "$@"; fi; }
build swift build --product payop-ipnd
build swift build --product payop-simulator
PAYOP_BIN_DIR=$(swift build --show-bin-path)
export PAYOP_BIN_DIR
export SCREENSHOT_DIR=${SCREENSHOT_DIR:-$PWD/docs/screenshots}

exec python3 -m pytest -q -p no:cacheprovider browser-tests "$@"
