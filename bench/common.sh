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

# release_binary PRODUCT builds PRODUCT in release mode and prints its path. PAYOP_IPND_BIN and
# PAYOP_SIMULATOR_BIN name another payop-ipnd or payop-simulator binary to run instead (a baseline built
# from an earlier commit).
release_binary() {
    local variable=
    case $1 in
        payop-ipnd) variable=PAYOP_IPND_BIN ;;
        payop-simulator) variable=PAYOP_SIMULATOR_BIN ;;
    esac
    local other=${variable:+${!variable:-}}
    if [ -n "$other" ]; then
        case $other in /*) ;; *) echo "$variable must be an absolute path" >&2; return 1 ;; esac
        [ -x "$other" ] || { echo "$variable: $other is not an executable" >&2; return 1; }
        echo "$other"
        return
    fi
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

# verifying_config FILE PORT STORAGE PAYOP_PORT JWT_FILE HOOK_COMMAND writes a daemon config that
# verifies against a simulator on PAYOP_PORT and runs HOOK_COMMAND for every checkout event; its admin
# listener is on PORT + 2.
verifying_config() {
    cat >"$1" <<YAML
log_level: warning
server:
  listen: 127.0.0.1:$2
  allowed_sources: any
admin:
  listen: 127.0.0.1:$(($2 + 2))
storage:
  path: $3
payop:
  api_base_url: http://127.0.0.1:$4
  jwt_file: $5
hooks:
  - name: bench
    command: [$6]
    events: ["checkout.*"]
YAML
}

# start_postgres DIR PORT starts a throwaway PostgreSQL cluster in DIR on 127.0.0.1:PORT (fsync and
# synchronous_commit on, as the daemon requires; trust authentication on loopback) with a database
# `payop`, installing Debian's postgresql when missing. stop_postgres DIR stops it.
start_postgres() {
    local dir=$1 port=$2 bin as=()
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || install_missing postgres-missing:postgresql
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        # The postgres user must reach DIR: mktemp's folders are root's only.
        chmod o+x "$(dirname "$dir")"
        chown postgres:postgres "$dir"
        as=(runuser -u postgres --)
    fi
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync --no-instructions >/dev/null
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=on -c synchronous_commit=on" \
        start >/dev/null
    "${as[@]}" "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE DATABASE payop" >/dev/null
}

stop_postgres() {
    local dir=$1 bin as=()
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
    [ -d "$dir/data" ] && "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
}

# Debian's `webhook` answers a request as soon as its hook is triggered and runs the command afterwards
# (unless `include-command-output-in-response` is set): its request rate is not its rate of /bin/true
# runs, which end seconds later under load, and under the benches' load many never start at all (it
# starts every command at once, and runs out of file descriptors: "fork/exec /bin/true: too many open
# files", still answered 200). start_webhook LOG PORT starts it with `-verbose`, which logs "finished
# handling" as each command ends and "error occurred" for each that could not run;
# webhook_runs_ended LOG START MIN then waits until at least MIN commands have ended and no more end
# for a second, and prints "ENDED FAILED SECONDS": how many ended, how many of those never ran, and
# when the last one ended, in seconds after START (a `date +%s.%N`). The daemon's end-to-end figures
# count to its hooks' last recorded run; these count webhook's work the same way.
start_webhook() { # LOG PORT
    cat >"$1.hooks.json" <<JSON
[{"id": "payop", "execute-command": "/bin/true", "http-methods": ["POST"]}]
JSON
    webhook -verbose -hooks "$1.hooks.json" -ip 127.0.0.1 -port "$2" >"$1" 2>&1 &
    PIDS+=($!)
}
webhook_runs_ended() { # LOG START MIN
    python3 - "$@" <<'PY2'
import sys, time
log, start, minimum = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
count, failed, last, carry = 0, 0, time.time(), b""
deadline = time.time() + 600
with open(log, "rb") as f:
    while time.time() < deadline:
        chunk = f.read()
        if chunk:
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            ended = sum(1 for line in lines if b"] finished handling " in line)
            failed += sum(1 for line in lines if b"] error occurred: " in line)
            if ended:
                count += ended
                last = time.time()
        elif count >= minimum and time.time() - last > 1.0:
            break
        time.sleep(0.02)
print(count, failed, f"{last - start:.3f}")
PY2
}
