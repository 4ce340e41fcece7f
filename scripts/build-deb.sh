#!/usr/bin/env bash
# Builds the Debian package payop-ipnd_VERSION_amd64.deb from a release build with the Swift runtime
# linked in (--static-swift-stdlib), so that it needs only Debian's own libraries (libc6, libgcc-s1,
# libstdc++6, zlib1g, libsqlite3-0, libssl3), procps (the unit's /bin/kill) and systemd's sysusers and
# tmpfiles (its postinst).
#
#   scripts/build-deb.sh [OUTPUT_DIR]      (default .build-deb; prints the package's path last)
#
# VERSION is PayopIPNDVersion.current (Sources/PayopIPND/Operations/Version.swift); the latest entry
# of packaging/deb/changelog must name the same version. What the package holds:
#   /usr/bin/payop-ipnd                             the stripped release binary
#   /usr/share/man/man1/payop-ipnd.1.gz             help2man's page from its --help and every command's
#   /lib/systemd/system/payop-ipnd.service          systemd/payop-ipnd.service, paths set to /usr/bin
#                                                   and /usr/share/doc
#   /etc/payop-ipnd/payop-ipnd.yaml                 conffile: config/payop-ipnd.example.yaml with the
#                                                   secrets as the unit's credentials (as with
#                                                   scripts/install.sh), the fulfil-order hook running
#                                                   the shipped example hook and the url hook commented
#                                                   out (its signing secret is yours to create)
#   /usr/lib/payop-ipnd/hooks/fulfil-order.example  config/hooks/fulfil-order.example
#   /usr/lib/sysusers.d/payop-ipnd.conf             the payop-ipnd system user
#   /usr/lib/tmpfiles.d/payop-ipnd.conf             /var/lib/payop-ipnd, and /etc/payop-ipnd's mode
#   /usr/share/doc/payop-ipnd/                      README.md, copyright, changelog.gz
#   /usr/share/lintian/overrides/payop-ipnd         the overrides, each with its reason
# and the maintainer scripts in packaging/deb (enable, never start; remove keeps config and event log).
# The Swift build (6 to 11 minutes from scratch on 2 cores) stays in .build-deb and is reused; it
# waits for /tmp/payop-build.lock ($PAYOP_BUILD_LOCK), so only one Swift build runs at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022

SCRATCH=.build-deb
OUT_DIR=${1:-$SCRATCH}
LOCK=${PAYOP_BUILD_LOCK:-/tmp/payop-build.lock}
PKGDIR=packaging/deb

die() { echo "build-deb: $*" >&2; exit 1; }

VERSION=$(sed -n 's/^ *public static let current = "\([0-9][0-9A-Za-z.+~]*\)".*/\1/p' Sources/PayopIPND/Operations/Version.swift)
[ -n "$VERSION" ] || die "no version in Sources/PayopIPND/Operations/Version.swift"
CHANGELOG_VERSION=$(sed -n '1s/^payop-ipnd (\([^)]*\)).*/\1/p' "$PKGDIR/changelog")
[ "$VERSION" = "$CHANGELOG_VERSION" ] ||
    die "Version.swift says $VERSION but $PKGDIR/changelog's latest entry is $CHANGELOG_VERSION: add an entry for $VERSION"
MAINTAINER=$(sed -n 's/^ -- \(.*>\)  .*$/\1/p' "$PKGDIR/changelog" | head -1)
CHANGELOG_DATE=$(sed -n 's/^ -- .*>  \(.*\)$/\1/p' "$PKGDIR/changelog" | head -1)
[ -n "$MAINTAINER" ] && [ -n "$CHANGELOG_DATE" ] || die "cannot read the maintainer line of $PKGDIR/changelog"
# As dpkg-buildpackage does: the changelog's date is the package's timestamp, so a rebuild is identical.
SOURCE_DATE_EPOCH=$(date -d "$CHANGELOG_DATE" +%s)
export SOURCE_DATE_EPOCH
[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || die "builds the amd64 package on an amd64 Debian only"

missing=()
pkg-config --exists sqlite3 libcrypto 2>/dev/null || missing+=(pkg-config libsqlite3-dev libssl-dev)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v strip >/dev/null || missing+=(binutils)
command -v help2man >/dev/null || missing+=(help2man)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "build-deb: swift build -c release --static-swift-stdlib (payop-ipnd $VERSION, in $SCRATCH)"
# -z now: full RELRO, as Debian's hardening flags ask.
flock "$LOCK" bash -c 'echo "build-deb: build lock taken after $(($(date +%s) - $1)) s"; shift; exec "$@"' _ "$(date +%s)" \
    swift build -c release --product payop-ipnd --static-swift-stdlib --scratch-path "$SCRATCH" -Xlinker -z -Xlinker now
BIN=$SCRATCH/x86_64-unknown-linux-gnu/release/payop-ipnd
[ -x "$BIN" ] || die "no binary at $BIN"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/payop-ipnd
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/etc/payop-ipnd" \
    "$ROOT/usr/lib/payop-ipnd/hooks" "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" \
    "$ROOT/usr/share/doc/payop-ipnd"

# The binary, stripped as dh_strip does. Only Debian's base libraries, SQLite and OpenSSL may remain
# dynamic: anything else would be a library the package does not depend on.
install -m 0755 "$BIN" "$ROOT/usr/bin/payop-ipnd"
strip --remove-section=.comment --strip-unneeded "$ROOT/usr/bin/payop-ipnd"
ALLOWED=" libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 ld-linux-x86-64.so.2 libgcc_s.so.1 libstdc++.so.6 libz.so.1 libsqlite3.so.0 libcrypto.so.3 libssl.so.3 "
NEEDED=$(objdump -p "$ROOT/usr/bin/payop-ipnd" | awk '$1 == "NEEDED" { print $2 }')
for lib in $NEEDED; do
    case "$ALLOWED" in *" $lib "*) ;; *) die "payop-ipnd links $lib dynamically; only Debian base libraries, SQLite and OpenSSL may be" ;; esac
done
if ldd "$ROOT/usr/bin/payop-ipnd" | grep -q 'not found'; then ldd "$ROOT/usr/bin/payop-ipnd"; die "unresolved libraries"; fi
echo "build-deb: payop-ipnd needs" $NEEDED

# The manual page: help2man on the binary's --help, the sections in packaging/deb/payop-ipnd.h2m, and
# every command's own help (`payop-ipnd help CMD`), so it cannot drift from the binary.
subcommands() { "$ROOT/usr/bin/payop-ipnd" help "$@" | sed -n '/^SUBCOMMANDS:/,/^$/s/^  \([a-z][a-z-]*\)  .*/\1/p'; }
command_help() {
    printf '.SS "payop-ipnd %s"\n.nf\n' "$*"
    "$ROOT/usr/bin/payop-ipnd" help "$@" | grep -v -e '^  --version  ' -e '^  -h, --help  ' | sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"
    printf '.fi\n'
}
{
    cat "$PKGDIR/payop-ipnd.h2m"
    printf '\n[COMMANDS]\n'
    for command in $(subcommands); do
        nested=$(subcommands "$command")
        if [ -z "$nested" ]; then command_help "$command"; else for sub in $nested; do command_help "$command" "$sub"; done; fi
    done
} >"$WORK/payop-ipnd.h2m"
grep -q '^.SS "payop-ipnd serve"' "$WORK/payop-ipnd.h2m" || die "cannot read the commands off payop-ipnd help"
install -d "$ROOT/usr/share/man/man1"
help2man --no-info --no-discard-stderr --version-string="$VERSION" --include="$WORK/payop-ipnd.h2m" \
    --output="$WORK/payop-ipnd.1" "$ROOT/usr/bin/payop-ipnd"
gzip -9nc "$WORK/payop-ipnd.1" >"$ROOT/usr/share/man/man1/payop-ipnd.1.gz"

# The unit, from the repository's own: the binary and the README where the package puts them.
sed -e 's|^ExecStart=/usr/local/bin/payop-ipnd |ExecStart=/usr/bin/payop-ipnd |' \
    -e 's|^Documentation=file:///usr/local/share/doc/payop-ipnd/|Documentation=file:///usr/share/doc/payop-ipnd/|' \
    -e 's|^# payop-ipnd as a hardened systemd service. Install with scripts/install.sh; |# payop-ipnd as a hardened systemd service. Installed by the payop-ipnd package; |' \
    systemd/payop-ipnd.service >"$ROOT/lib/systemd/system/payop-ipnd.service"
grep -q '^ExecStart=/usr/bin/payop-ipnd serve ' "$ROOT/lib/systemd/system/payop-ipnd.service" &&
    grep -q '^Documentation=file:///usr/share/doc/payop-ipnd/README.md$' "$ROOT/lib/systemd/system/payop-ipnd.service" &&
    ! grep -q '/usr/local' "$ROOT/lib/systemd/system/payop-ipnd.service" ||
    die "systemd/payop-ipnd.service changed: adjust its ExecStart/Documentation rewriting here"

# The configuration: the example, with the secrets as the unit's credentials (bare names, as with
# install.sh), the command hook running the shipped example hook, and the url hook commented out, so
# that `payop-ipnd check-config` passes on the installed files without anything made up.
HOOK=/usr/lib/payop-ipnd/hooks/fulfil-order.example
sed -e "s|^  jwt_file: payop-jwt .*|  jwt_file: payop-jwt                  # Payop's JWT, in /etc/payop-ipnd/payop-jwt; a bare name is looked up in|" \
    -e "s|^  secret_key_file: payop-secret-key .*|  secret_key_file: payop-secret-key    # your project's secret key (legacy V1), in /etc/payop-ipnd/payop-secret-key|" \
    -e "s|^    command: \[/usr/local/lib/shop/fulfil, --from-payop\] .*|    command: [$HOOK, --from-payop]   # (example) your shop's program; exec'd directly, never through a shell|" \
    config/payop-ipnd.example.yaml |
    awk '
        /^  - name: crm$/ { print "  # A url hook: create its signing secret file (one line, chmod 600), then uncomment it."; url = 1 }
        url && /^  - name: / && !/^  - name: crm$/ { url = 0 }
        url && !/^    / && !/^  - name: crm$/ { url = 0 }
        { print (url ? "#" $0 : $0) }
    ' >"$ROOT/etc/payop-ipnd/payop-ipnd.yaml"
grep -q '^  jwt_file: payop-jwt  *# Payop.s JWT, in /etc/payop-ipnd/payop-jwt;' "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" &&
    grep -q '^  secret_key_file: payop-secret-key  *# .*, in /etc/payop-ipnd/payop-secret-key$' "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" &&
    grep -qF "    command: [$HOOK, --from-payop]" "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" &&
    grep -q '^#  - name: crm$' "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" &&
    grep -q '^#    signing_secret_file: ' "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" &&
    ! grep -q '^ *signing_secret_file:' "$ROOT/etc/payop-ipnd/payop-ipnd.yaml" ||
    die "config/payop-ipnd.example.yaml changed: adjust its rewriting here"
chmod 0644 "$ROOT/etc/payop-ipnd/payop-ipnd.yaml"
echo /etc/payop-ipnd/payop-ipnd.yaml >"$ROOT/DEBIAN/conffiles"

install -m 0755 config/hooks/fulfil-order.example "$ROOT$HOOK"
install -m 0644 "$PKGDIR/payop-ipnd.sysusers" "$ROOT/usr/lib/sysusers.d/payop-ipnd.conf"
install -m 0644 "$PKGDIR/payop-ipnd.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/payop-ipnd.conf"
# Uncompressed, because the unit's Documentation= names it.
install -m 0644 README.md "$ROOT/usr/share/doc/payop-ipnd/README.md"
install -m 0644 "$PKGDIR/copyright" "$ROOT/usr/share/doc/payop-ipnd/copyright"
install -D -m 0644 "$PKGDIR/lintian-overrides" "$ROOT/usr/share/lintian/overrides/payop-ipnd"
# A native package (the packaging lives with the code): its changelog is changelog.gz.
gzip -9nc "$PKGDIR/changelog" >"$ROOT/usr/share/doc/payop-ipnd/changelog.gz"
install -m 0755 "$PKGDIR/postinst" "$PKGDIR/prerm" "$PKGDIR/postrm" "$ROOT/DEBIAN/"

# Depends: what dpkg-shlibdeps reads off the binary's libraries; procps for the unit's
# ExecReload=/bin/kill; the postinst's sysusers and tmpfiles (systemd's own, or a standalone one).
mkdir -p "$WORK/src/debian"
printf 'Source: payop-ipnd\n\nPackage: payop-ipnd\nArchitecture: amd64\n' >"$WORK/src/debian/control"
SHLIBS=$(cd "$WORK/src" && dpkg-shlibdeps -O "$ROOT/usr/bin/payop-ipnd" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no dependencies"
DEPENDS="$SHLIBS, procps, systemd | systemd-sysusers, systemd | systemd-tmpfiles"

# KiB, counted as dpkg-gencontrol does: each file rounded up, 1 for each directory.
INSTALLED_SIZE=$(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%s\n' -o -printf '1024\n' |
    awk '{ kib += int(($1 + 1023) / 1024) } END { print kib }')
sed -e "s|@VERSION@|$VERSION|" -e "s|@MAINTAINER@|$MAINTAINER|" -e "s|@INSTALLED_SIZE@|$INSTALLED_SIZE|" \
    -e "s/@DEPENDS@/$DEPENDS/" "$PKGDIR/control.in" >"$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/md5sums"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$OUT_DIR"
DEB=$(cd "$OUT_DIR" && pwd)/payop-ipnd_${VERSION}_amd64.deb
dpkg-deb --build --root-owner-group -Zxz "$ROOT" "$DEB" >/dev/null
echo "build-deb: Depends: $DEPENDS"
echo "build-deb: $(stat -c %s "$DEB" | numfmt --to=iec-i --suffix=B) ($(stat -c %s "$DEB") bytes), installed $INSTALLED_SIZE KiB"
echo "$DEB"
