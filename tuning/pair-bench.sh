#!/usr/bin/env bash
# The replication figures of BENCHMARKS.md: a primary and a replica on this
# machine (both on SERVER_CPU, both fsyncing), the driver on DRIVER_CPU.
# Per run, fresh data directories:
#   msgs --offline C=64 W=16 S=100 with --admin (STORED/s, CPU, replica lag p99)
#   msgs --offline C=1 W=1 S=100 (store-ack latency floor through the pair)
#
#   tuning/pair-bench.sh [RUNS] [OUT_DIR]     # default 3 runs, /tmp/iris-pair
#
# Writes OUT_DIR/results.jsonl and prints the median of each figure. Needs jq.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"

runs="${1:-3}"
out="${2:-/tmp/iris-pair}"
duration="${DURATION:-10s}"
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }
PROFILE="${PROFILE:-release}" build_profiling
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

# REPLICA_CPU pins the replica (default: SERVER_CPU, beside the primary).
REPLICA_CPU="${REPLICA_CPU:-$SERVER_CPU}"

# Starts a node pinned to CPU $2; prints "pid client_addr repl_addr admin_addr".
start_node() {
    local dir="$1" cpu="$2"
    shift 2
    mkdir -p "$dir"
    MIMALLOC_ALLOW_THP=0 taskset -c "$cpu" "$IRIS" serve --cores 1 --listen 127.0.0.1:0 \
        --replication-listen 127.0.0.1:0 --admin 127.0.0.1:0 --data "$dir/data" \
        --inbox-len-max 1000000 "$@" >"$dir/stdout" 2>"$dir/stderr" </dev/null &
    local pid=$!
    for _ in $(seq 1 100); do
        if grep -q "^iris admin listening" "$dir/stdout" 2>/dev/null; then
            echo "$pid $(awk '/^iris listening/{print $4}' "$dir/stdout") \
$(awk '/replication listening/{print $5}' "$dir/stdout") $(awk '/admin listening/{print $5}' "$dir/stdout")"
            return 0
        fi
        sleep 0.1
    done
    echo "node did not start:" >&2
    cat "$dir/stderr" >&2
    return 1
}

# Waits until the primary's stats say mode "replica" (the replica caught up).
wait_sync_mode() {
    for _ in $(seq 1 100); do
        "$IRIS" admin stats --admin "$1" 2>/dev/null | grep -q '"mode":"replica"' && return 0
        sleep 0.1
    done
    echo "the primary never reached mode replica" >&2
    return 1
}

pair_run() {
    local label="$1"
    shift
    local base
    base="$(mktemp -d "${TMPDIR:-/tmp}/iris-pair.XXXXXX")"
    read -r ppid paddr prepl padmin < <(start_node "$base/primary" "$SERVER_CPU")
    read -r rpid _ _ _ < <(start_node "$base/replica" "$REPLICA_CPU" --replica-of "$prepl")
    wait_sync_mode "$padmin"
    taskset -c "$DRIVER_CPU" "$BENCH" msgs --addr "$paddr" --server-pid "$ppid" --admin "$padmin" \
        --json "$@" | jq -c --arg l "$label" '. + {"label": $l}' >>"$results"
    kill "$ppid" "$rpid" 2>/dev/null || true
    wait "$ppid" "$rpid" 2>/dev/null || true
    rm -rf -- "$base"
}

for run in $(seq 1 "$runs"); do
    echo "run $run/$runs" >&2
    pair_run pair-offline-c64 --offline --conns 64 --inflight 16 --size 100 --duration "$duration"
    pair_run pair-c1 --offline --conns 1 --inflight 1 --size 100 --duration "$duration"
done

median() { jq -s "[.[] | select(.label == \"$1\") | .$2] | sort | .[length/2|floor]" "$results"; }
for label in pair-offline-c64 pair-c1; do
    printf '%s:' "$label"
    for key in stored_per_sec ack_p50_us ack_p99_us server_cpu_us_per_msg replica_lag_p50_ms replica_lag_p99_ms; do
        printf ' %s=%s' "$key" "$(median "$label" "$key")"
    done
    echo
done
