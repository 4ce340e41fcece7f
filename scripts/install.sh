#!/usr/bin/env bash
# Builds payop-ipnd in release mode and installs it as a systemd service:
#   /usr/local/bin/payop-ipnd, /etc/systemd/system/payop-ipnd.service,
#   /etc/payop-ipnd/payop-ipnd.yaml (from the example, only if absent), the payop-ipnd user.
# Run as root from the repository. Safe to run again for an upgrade: the config and secrets stay.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root"; exit 1; }

if ! pkg-config --exists sqlite3 libcrypto; then
    apt-get update && apt-get install -y libsqlite3-dev libssl-dev
fi
swift build -c release --product payop-ipnd
BIN=$(swift build -c release --show-bin-path)/payop-ipnd

id payop-ipnd >/dev/null 2>&1 || useradd --system --home-dir /var/lib/payop-ipnd --shell /usr/sbin/nologin payop-ipnd
install -m 0755 "$BIN" /usr/local/bin/payop-ipnd.new
mv /usr/local/bin/payop-ipnd.new /usr/local/bin/payop-ipnd
install -d -m 0750 -o root -g payop-ipnd /etc/payop-ipnd
if [ ! -e /etc/payop-ipnd/payop-ipnd.yaml ]; then
    sed -e 's|^  jwt_file: payop-jwt .*|  jwt_file: payop-jwt                  # LoadCredential= in the unit|' \
        -e 's|^  secret_key_file: payop-secret-key .*|  secret_key_file: payop-secret-key    # LoadCredential= in the unit|' \
        config/payop-ipnd.example.yaml >/etc/payop-ipnd/payop-ipnd.yaml
    chmod 0640 /etc/payop-ipnd/payop-ipnd.yaml
    chgrp payop-ipnd /etc/payop-ipnd/payop-ipnd.yaml
    echo "wrote /etc/payop-ipnd/payop-ipnd.yaml from the example: edit its hooks before starting"
fi
for secret in payop-jwt payop-secret-key; do
    if [ ! -e "/etc/payop-ipnd/$secret" ]; then
        install -m 0600 -o root -g root /dev/null "/etc/payop-ipnd/$secret"
        echo "created an empty /etc/payop-ipnd/$secret: put the secret in it (one line)"
    fi
done
install -d -m 0755 /usr/local/share/doc/payop-ipnd
install -m 0644 README.md /usr/local/share/doc/payop-ipnd/README.md
install -m 0644 systemd/payop-ipnd.service /etc/systemd/system/payop-ipnd.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed; check with: payop-ipnd check-config --config /etc/payop-ipnd/payop-ipnd.yaml"
    echo "then: systemctl enable --now payop-ipnd (or systemctl restart payop-ipnd for an upgrade)"
fi
