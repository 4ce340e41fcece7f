# Shared by the scripts under bench/ and scripts/: sourced, not run.

# install_missing COMMAND:PACKAGE ... installs the Debian packages whose command is missing.
install_missing() {
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

# release_binary PRODUCT builds PRODUCT in release mode and prints its path.
release_binary() {
    swift build -c release --product "$1" >/dev/null
    echo "$(swift build -c release --show-bin-path)/$1"
}

# wait_port PORT waits up to 10 s for something to listen on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1"
    return 1
}
