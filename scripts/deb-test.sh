#!/usr/bin/env bash
# Builds the Debian package (scripts/build-deb.sh) and proves it on a clean Debian 12: a debootstrap
# chroot from this machine's own Debian mirror, where `dpkg -i` and `apt-get -f install` bring in what
# it depends on. Then, from the installed files: `payop-ipnd --version`, `check-config` on the shipped
# configuration (as root, and as the daemon's user with the secrets handed over as systemd would),
# `systemd-analyze verify` on the installed unit, the files, user and modes the package promises, the
# unit enabled and nothing started; an upgrade over an edited conffile (the edit is kept); remove
# (configuration and event log kept), purge (event log kept), purge with PAYOP_IPND_PURGE_DATA=yes
# (gone). lintian checks the package on this machine. Prints the package's size and the time taken;
# exits non-zero at the first failure.
#
#   scripts/deb-test.sh
#
# Without a chroot (debootstrap failing, or taking more than PAYOP_DEB_CHROOT_SECONDS, 300), the same
# checks run on this machine itself, but only where that is safe to do: under CI (CI=true) or with
# PAYOP_DEB_TEST_HOST=1 (which also skips the chroot), and never where payop-ipnd, /etc/payop-ipnd or
# /var/lib/payop-ipnd already exist. PAYOP_DEB_MIRROR overrides the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
CHROOT_SECONDS=${PAYOP_DEB_CHROOT_SECONDS:-300}
say() { echo "deb-test: $*"; }
fail() { echo "deb-test: FAIL: $*" >&2; exit 1; }
since() { echo "$(($(date +%s) - $1)) s"; }

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v lintian >/dev/null || missing+=(lintian)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the package --------------------------------------------------------------------------------
bash scripts/build-deb.sh | tee /tmp/payop-deb-build.log
DEB=$(tail -1 /tmp/payop-deb-build.log)
[ -f "$DEB" ] || fail "scripts/build-deb.sh made no package"
VERSION=$(dpkg-deb -f "$DEB" Version)
SIZE=$(stat -c %s "$DEB")
BUILD_TIME=$(since "$START")
say "built $(basename "$DEB") in $BUILD_TIME"

# Errors and warnings fail; info and pedantic tags are printed. An override needs its reason next to it
# (packaging/deb/lintian-overrides).
LINTIAN_OUT=$(lintian --display-level '>=pedantic' "$DEB" 2>&1 | grep -v '^running with root privileges') || true
say "lintian $(lintian --version | awk '{print $2}'): $(grep -c '^E: ' <<<"$LINTIAN_OUT") errors, $(grep -c '^W: ' <<<"$LINTIAN_OUT") warnings"
# Misspellings lintian finds in the strings of the libraries linked in are not ours to fix: counted only.
grep -v 'spelling-error-in-binary' <<<"$LINTIAN_OUT" | sed '/^$/d; s/^/  /'
echo "  ($(grep -c 'spelling-error-in-binary' <<<"$LINTIAN_OUT") spelling-error-in-binary infos, from the libraries' strings)"
if grep -q '^[EW]: ' <<<"$LINTIAN_OUT"; then fail "lintian reported errors or warnings"; fi

# --- where to install it ------------------------------------------------------------------------
ROOT=""
WORK=""
HOST_INSTALLED=""
cleanup() {
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r umount -l 2>/dev/null || true
        # --one-file-system: never into a mount that failed to go away.
        rm -rf --one-file-system "$WORK"
    fi
    # On this machine, leave nothing of a failed run behind (nothing of it was here before).
    if [ -n "$HOST_INSTALLED" ] && dpkg-query -W payop-ipnd >/dev/null 2>&1; then
        PAYOP_IPND_PURGE_DATA=yes dpkg --purge payop-ipnd >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

mirror() {
    if [ -n "${PAYOP_DEB_MIRROR:-}" ]; then echo "$PAYOP_DEB_MIRROR"; return; fi
    # The first Debian archive apt here uses (not the security archive), in either sources format.
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        sed -n -e 's/^URIs: *//p' -e 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' | tr ' ' '\n' |
        grep -E '^https?://[^ ]*/debian/?$' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

MODE=chroot
if [ "${PAYOP_DEB_TEST_HOST:-}" = 1 ]; then
    MODE=host
else
    MIRROR=$(mirror)
    WORK=$(mktemp -d /var/tmp/payop-deb-test.XXXXXX)
    ROOT=$WORK/root
    say "debootstrap --variant=minbase bookworm from $MIRROR (at most $CHROOT_SECONDS s)"
    CHROOT_START=$(date +%s)
    if ! timeout "$CHROOT_SECONDS" debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        tail -5 "$WORK/debootstrap.log" >&2 || true
        cleanup
        ROOT=""
        WORK=""
        if [ "${CI:-}" = true ]; then
            say "no chroot could be made: testing on this machine instead (CI)"
            MODE=host
        else
            fail "no chroot could be made; PAYOP_DEB_TEST_HOST=1 tests on this machine instead"
        fi
    else
        say "chroot ready in $(since "$CHROOT_START")"
        mount -t proc proc "$ROOT/proc"
        # Nothing a package installs may start a service inside the chroot.
        printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
        chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
        cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    fi
fi
if [ "$MODE" = host ]; then
    if dpkg-query -W -f='${Status}' payop-ipnd 2>/dev/null | grep -q 'installed\|config-files'; then
        fail "payop-ipnd is already installed here: test it in a chroot, or remove it first"
    fi
    for path in /etc/payop-ipnd /var/lib/payop-ipnd; do
        [ ! -e "$path" ] || fail "$path exists here: this test would remove it; test in a chroot instead"
    done
    HOST_INSTALLED=1
fi

# Runs a command on the system under test (the chroot, or this machine).
on() { if [ -n "$ROOT" ]; then chroot "$ROOT" "$@"; else "$@"; fi; }
on_env() { if [ -n "$ROOT" ]; then chroot "$ROOT" env "$@"; else env "$@"; fi; }
path() { echo "$ROOT$1"; }
expect_file() { [ -e "$(path "$1")" ] || fail "$1 is missing"; }
expect_gone() { [ ! -e "$(path "$1")" ] || fail "$1 is still there"; }
expect_stat() { # PATH MODE USER GROUP
    local got
    got=$(on stat -c '%a %U %G' "$1") || fail "$1 is missing"
    [ "$got" = "$2 $3 $4" ] || fail "$1 is $got, not $2 $3 $4"
}

# --- install ------------------------------------------------------------------------------------
cp "$DEB" "$(path /tmp/)"
DEB_IN=/tmp/$(basename "$DEB")
say "dpkg -i $(basename "$DEB") ($MODE)"
if [ -n "$ROOT" ]; then on apt-get update -qq; fi
on dpkg -i "$DEB_IN" >/tmp/payop-deb-install.log 2>&1 || {
    grep -q 'dependency problems' /tmp/payop-deb-install.log || { cat /tmp/payop-deb-install.log; fail "dpkg -i failed"; }
    say "apt-get -f install (the dependencies dpkg -i asked for)"
    on_env DEBIAN_FRONTEND=noninteractive apt-get -f install -y -qq --no-install-recommends >>/tmp/payop-deb-install.log 2>&1 ||
        { cat /tmp/payop-deb-install.log; fail "apt-get -f install failed"; }
}
sed -n '/^payop-ipnd is installed/,/not even at boot/p' /tmp/payop-deb-install.log | sed 's/^/  | /'
grep -q 'payop-ipnd is installed and enabled, but not started' /tmp/payop-deb-install.log ||
    { cat /tmp/payop-deb-install.log; fail "the postinst did not say the daemon must be configured first"; }
[ "$(on dpkg-query -W -f='${Status}' payop-ipnd)" = "install ok installed" ] || fail "payop-ipnd is not installed"

# --- the installed files ------------------------------------------------------------------------
GOT=$(on /usr/bin/payop-ipnd --version)
[ "$GOT" = "$VERSION" ] || fail "payop-ipnd --version printed '$GOT', not $VERSION"
say "payop-ipnd --version: $GOT"

OUT=$(on /usr/bin/payop-ipnd check-config --config /etc/payop-ipnd/payop-ipnd.yaml 2>&1) ||
    { echo "$OUT"; fail "check-config fails on the shipped configuration"; }
say "payop-ipnd check-config --config /etc/payop-ipnd/payop-ipnd.yaml: $OUT"

# As the unit runs it: the daemon's user, the secrets in $CREDENTIALS_DIRECTORY.
CREDS=/run/payop-ipnd-deb-test-credentials
on install -d -m 0700 -o payop-ipnd -g payop-ipnd "$CREDS"
on install -m 0400 -o payop-ipnd -g payop-ipnd /etc/payop-ipnd/payop-jwt "$CREDS/payop-jwt"
on install -m 0400 -o payop-ipnd -g payop-ipnd /etc/payop-ipnd/payop-secret-key "$CREDS/payop-secret-key"
OUT=$(on_env CREDENTIALS_DIRECTORY="$CREDS" setpriv --reuid=payop-ipnd --regid=payop-ipnd --clear-groups \
    /usr/bin/payop-ipnd check-config --config /etc/payop-ipnd/payop-ipnd.yaml 2>&1) ||
    { echo "$OUT"; fail "check-config fails as the payop-ipnd user"; }
on rm -rf "$CREDS"
say "check-config as the payop-ipnd user, secrets as credentials: $OUT"

OUT=$(on systemd-analyze verify /lib/systemd/system/payop-ipnd.service 2>&1) ||
    { echo "$OUT"; fail "systemd-analyze verify failed on the installed unit"; }
[ -z "$OUT" ] || { echo "$OUT"; fail "systemd-analyze verify printed warnings on the installed unit"; }
say "systemd-analyze verify /lib/systemd/system/payop-ipnd.service: clean"
# The installed binary at work, in a network namespace of its own (loopback only): the README's sandbox,
# one simulated payment posted, verified against the simulator and handed to the demo hook, a clean stop.
cat >"$(path /tmp/payop-deb-smoke.sh)" <<'SMOKE'
#!/bin/sh
set -e
rm -rf /tmp/payop-deb-sandbox && mkdir -p /tmp/payop-deb-sandbox && cd /tmp/payop-deb-sandbox
/usr/bin/payop-ipnd serve --sandbox >serve.log 2>&1 &
pid=$!
give_up() { echo "$1"; cat serve.log; kill -KILL $pid 2>/dev/null; exit 1; }
i=0
until /usr/bin/payop-ipnd simulate checkout --state accepted >simulate.log 2>&1; do
    i=$((i + 1)); [ $i -lt 100 ] || give_up "the sandbox never took the simulated IPN: $(cat simulate.log)"; sleep 0.2
done
i=0
until grep -q ' checkout.accepted ' .payop-ipnd-sandbox/fulfilled.log 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 100 ] || give_up "the demo hook never ran"; sleep 0.2
done
/usr/bin/payop-ipnd events list --config .payop-ipnd-sandbox/payop-ipnd.yaml | grep -q ' checkout.accepted  verified ' ||
    give_up "no verified event in the log"
kill -TERM $pid
wait $pid || give_up "serve --sandbox exited $? on SIGTERM"
cat .payop-ipnd-sandbox/fulfilled.log
SMOKE
if [ -n "$ROOT" ]; then RUN_SMOKE="chroot $ROOT sh /tmp/payop-deb-smoke.sh"; else RUN_SMOKE="sh /tmp/payop-deb-smoke.sh"; fi
OUT=$(timeout 120 unshare --net sh -c "ip link set lo up && $RUN_SMOKE" 2>&1) || { echo "$OUT"; fail "the installed payop-ipnd does not work"; }
rm -rf "$(path /tmp/payop-deb-sandbox)" "$(path /tmp/payop-deb-smoke.sh)"
say "serve --sandbox + simulate checkout: verified and hooked ($OUT), then a clean stop"

grep -q '^ExecStart=/usr/bin/payop-ipnd serve --config /etc/payop-ipnd/payop-ipnd.yaml$' \
    "$(path /lib/systemd/system/payop-ipnd.service)" || fail "the unit does not run /usr/bin/payop-ipnd"

on dpkg-query -W -f='${Conffiles}\n' payop-ipnd | grep -q '^ /etc/payop-ipnd/payop-ipnd.yaml ' ||
    fail "/etc/payop-ipnd/payop-ipnd.yaml is not a conffile"
for f in /usr/bin/payop-ipnd /usr/lib/sysusers.d/payop-ipnd.conf /usr/lib/tmpfiles.d/payop-ipnd.conf \
    /usr/lib/payop-ipnd/hooks/fulfil-order.example /usr/share/doc/payop-ipnd/README.md \
    /usr/share/doc/payop-ipnd/copyright /usr/share/doc/payop-ipnd/changelog.gz; do
    expect_file "$f"
done
on getent passwd payop-ipnd | grep -q ':/var/lib/payop-ipnd:/usr/sbin/nologin$' || fail "no payop-ipnd system user"
expect_stat /var/lib/payop-ipnd 750 payop-ipnd payop-ipnd
expect_stat /etc/payop-ipnd 750 root payop-ipnd
expect_stat /etc/payop-ipnd/payop-jwt 600 root root
expect_stat /etc/payop-ipnd/payop-secret-key 600 root root
[ -L "$(path /etc/systemd/system/multi-user.target.wants/payop-ipnd.service)" ] || fail "the unit is not enabled"
for exe in /proc/[0-9]*/exe; do
    [ "$(readlink "$exe" 2>/dev/null)" != "$ROOT/usr/bin/payop-ipnd" ] ||
        fail "the installed payop-ipnd runs (${exe%/exe}): the package must not start it"
done
say "files, user, modes: as promised; the unit is enabled and nothing was started"

# --- upgrade over an edited conffile ------------------------------------------------------------
echo "# edited by deb-test" >>"$(path /etc/payop-ipnd/payop-ipnd.yaml)"
echo "stand-in for the event log" >"$(path /var/lib/payop-ipnd/events.sqlite3)"
on dpkg -i "$DEB_IN" >/tmp/payop-deb-upgrade.log 2>&1 || { cat /tmp/payop-deb-upgrade.log; fail "dpkg -i over itself failed"; }
tail -1 "$(path /etc/payop-ipnd/payop-ipnd.yaml)" | grep -q '^# edited by deb-test$' || fail "the upgrade lost the edited conffile"
say "upgrade (dpkg -i again): the edited configuration was kept"

# --- remove, purge ------------------------------------------------------------------------------
on dpkg --remove payop-ipnd | sed 's/^/  | /'
expect_gone /usr/bin/payop-ipnd
expect_gone /lib/systemd/system/payop-ipnd.service
expect_file /etc/payop-ipnd/payop-ipnd.yaml
expect_file /etc/payop-ipnd/payop-jwt
expect_file /var/lib/payop-ipnd/events.sqlite3
say "dpkg --remove: binary and unit gone; configuration and event log kept"

on dpkg --purge payop-ipnd | sed 's/^/  | /'
expect_gone /etc/payop-ipnd
expect_gone /etc/systemd/system/multi-user.target.wants/payop-ipnd.service
expect_file /var/lib/payop-ipnd/events.sqlite3
say "dpkg --purge: configuration gone; event log kept"

on dpkg -i "$DEB_IN" >/tmp/payop-deb-reinstall.log 2>&1 || { cat /tmp/payop-deb-reinstall.log; fail "reinstall failed"; }
expect_file /var/lib/payop-ipnd/events.sqlite3
on_env PAYOP_IPND_PURGE_DATA=yes dpkg --purge payop-ipnd | sed 's/^/  | /'
expect_gone /etc/payop-ipnd
expect_gone /var/lib/payop-ipnd
say "reinstall, then PAYOP_IPND_PURGE_DATA=yes dpkg --purge: configuration and event log gone"

say "ok: $(basename "$DEB"), $SIZE bytes ($(numfmt --to=iec-i --suffix=B "$SIZE")), installed $(dpkg-deb -f "$DEB" Installed-Size) KiB; tested $([ "$MODE" = chroot ] && echo "in a clean Debian 12 chroot" || echo "on this machine"); $(since "$START") in all, $BUILD_TIME of it building"
