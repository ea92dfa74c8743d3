#!/usr/bin/env bash
# The MQTT side of BENCHMARKS.md, rerunnable: QoS 1 PUBLISH throughput and
# PUBACK latency into Iris (`iris serve --mqtt-listen`: PUBACK once the
# message is fsync'ed) and into Mosquitto (PUBACK from memory: persistence
# off, no subscribers), on the same load shape in the same run. Each broker
# runs alone on CPU 1, started fresh for every run (Iris on a scratch data
# directory), and `mqtt-bench` drives it from CPU 0. Prints one JSON object
# per run (`label` says which broker).
#
#   bench/mqtt/compare.sh [RUNS] [DURATION]   # default: 3 runs of each shape, 10s each
#
# Shapes: C=64 W=16 and C=1 W=1, 100-byte payloads. Needs the Mosquitto
# broker (apt-get install -y mosquitto) and a release build of iris and
# mqtt-bench (cargo build --release -p engine --bin iris -p bench --bin mqtt-bench);
# BIN_DIR=dir takes the binaries from elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-3}"
duration="${2:-10s}"
bin="${BIN_DIR:-./target/release}"
iris="$bin/iris"
bench="$bin/mqtt-bench"
server_cpu="${SERVER_CPU:-1}"
driver_cpu="${DRIVER_CPU:-0}"
for b in "$iris" "$bench"; do
    [ -x "$b" ] || { echo "build first: cargo build --release -p engine --bin iris -p bench --bin mqtt-bench ($b missing)" >&2; exit 1; }
done
mosquitto="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[ -x "$mosquitto" ] || { echo "needs the Mosquitto broker: apt-get install -y mosquitto" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/mqtt-compare.XXXXXX")"
broker_pid=""
stop_broker() {
    if [ -n "$broker_pid" ]; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
        broker_pid=""
    fi
}
trap 'stop_broker; rm -rf -- "$scratch"' EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a fresh Iris with an MQTT listener; sets broker_pid and addr.
start_iris() {
    rm -rf -- "$scratch/iris"
    MIMALLOC_ALLOW_THP=0 taskset -c "$server_cpu" "$iris" serve --cores 1 --listen 127.0.0.1:0 \
        --mqtt-listen 127.0.0.1:0 --data "$scratch/iris" >"$scratch/iris.out" 2>"$scratch/iris.err" </dev/null &
    broker_pid=$!
    addr=""
    for _ in $(seq 1 100); do
        addr="$(sed -n 's/^iris mqtt listening on //p' "$scratch/iris.out")"
        [ -n "$addr" ] && return 0
        sleep 0.1
    done
    echo "iris did not start:" >&2
    cat "$scratch/iris.err" >&2
    exit 1
}

# Starts a fresh Mosquitto (in memory, anonymous, TCP_NODELAY like Iris); sets broker_pid and addr.
start_mosquitto() {
    local port
    port="$(free_port)"
    cat >"$scratch/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_connections -1
log_dest stderr
log_type error
CONF
    taskset -c "$server_cpu" "$mosquitto" -c "$scratch/mosquitto.conf" 2>"$scratch/mosquitto.err" </dev/null &
    broker_pid=$!
    addr="127.0.0.1:$port"
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "mosquitto did not start:" >&2
    cat "$scratch/mosquitto.err" >&2
    exit 1
}

for shape in "64 16" "1 1"; do
    set -- $shape
    for _ in $(seq 1 "$runs"); do
        for broker in iris mosquitto; do
            "start_$broker"
            taskset -c "$driver_cpu" "$bench" --addr "$addr" --conns "$1" --inflight "$2" \
                --size 100 --duration "$duration" --server-pid "$broker_pid" --label "$broker"
            stop_broker
        done
    done
done
