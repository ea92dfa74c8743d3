#!/usr/bin/env bash
# Every figure of the BENCHMARKS.md iris-bench section, in one run: floors,
# Iris (flood, msgs offline and online at C=64 W=16 S=100, C=1 W=1) and Redis
# (AOF, appendfsync always) under the same shapes, RUNS times each, with a
# fresh server per measurement. Server on CPU 1, driver on CPU 0.
#
#   tuning/benchmarks.sh [RUNS] [OUT_DIR]     # default 3 runs, /tmp/iris-benchmarks
#
# Writes OUT_DIR/results.jsonl (one iris-bench JSON object per line, with a
# "label") and prints the median of each figure per label. Needs
# redis-server (apt-get install -y redis-server) and jq. BIN_DIR=dir uses
# prebuilt iris and iris-bench; otherwise builds the release profile.
#
# The Iris server gets --inbox-len-max 1000000: the offline runs park every
# message in 64 inboxes (~100,000 each at 600,000/s over 11 s), and the
# default bound of 100,000 would turn the end of the run into REJECTED 5.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"

runs="${1:-3}"
out="${2:-/tmp/iris-benchmarks}"
duration="${DURATION:-10s}"
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }
PROFILE="${PROFILE:-release}" build_profiling
IRIS_EXTRA_ARGS=(--inbox-len-max 1000000)
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

record() { jq -c --arg l "$1" '. + {"label": $l}' >>"$results"; }

iris_run() {
    local label="$1"
    shift
    start_iris "${IRIS_EXTRA_ARGS[@]}"
    # The WAL maps its preallocated spare segment (64 MiB, MAP_POPULATE) a few
    # seconds after start: let that land before a flood reads its baseline RSS.
    if [ "$1" = flood ]; then sleep "${FLOOD_SETTLE_S:-5}"; fi
    taskset -c "$DRIVER_CPU" "$BENCH" "$@" --addr "$IRIS_ADDR" --server-pid "$IRIS_PID" --json | record "$label"
    stop_iris
}

msgs_shape=(--conns 64 --inflight 16 --size 100 --duration "$duration")
latency_shape=(--conns 1 --inflight 1 --size 100 --duration "$duration")

for run in $(seq 1 "$runs"); do
    echo "run $run of $runs" >&2
    taskset -c 0,1 "$BENCH" floor --dir "${TMPDIR:-/tmp}" --json | record floor
    iris_run "iris flood 15000" flood --conns 15000 --rate 5000 --hold 5s
    iris_run "iris msgs offline C=64 W=16" msgs --offline "${msgs_shape[@]}"
    iris_run "iris msgs online C=64 W=16" msgs "${msgs_shape[@]}"
    iris_run "iris msgs offline C=1 W=1" msgs --offline "${latency_shape[@]}"
    iris_run "iris msgs online C=1 W=1" msgs "${latency_shape[@]}"

    eval "$("$ROOT/bench/redis/start-redis.sh" "$SERVER_CPU")"
    raddr="127.0.0.1:$REDIS_PORT"
    taskset -c "$DRIVER_CPU" "$BENCH" msgs --proto redis --addr "$raddr" "${msgs_shape[@]}" \
        --server-pid "$REDIS_PID" --json | record "redis LPUSH C=64 W=16"
    taskset -c "$DRIVER_CPU" "$BENCH" msgs --proto redis --addr "$raddr" "${latency_shape[@]}" \
        --server-pid "$REDIS_PID" --json | record "redis LPUSH C=1 W=1"
    "$ROOT/bench/redis/stop-redis.sh" "$REDIS_PID" "$REDIS_DIR"
    # Redis's flood on a fresh server, like Iris's.
    eval "$("$ROOT/bench/redis/start-redis.sh" "$SERVER_CPU")"
    taskset -c "$DRIVER_CPU" "$BENCH" flood --proto redis --addr "127.0.0.1:$REDIS_PORT" \
        --conns 15000 --rate 5000 --hold 5s --server-pid "$REDIS_PID" --json | record "redis flood 15000"
    "$ROOT/bench/redis/stop-redis.sh" "$REDIS_PID" "$REDIS_DIR"
done

# Median of every figure per label (lower middle for an even count).
jq -s '
  group_by(.label) | map(
    . as $runs | {label: $runs[0].label, runs: ($runs | length)} +
    ([ "stored_per_sec", "ack_p50_us", "ack_p99_us", "ack_p999_us", "e2e_p50_us", "e2e_p99_us",
       "server_cpu_us_per_msg", "driver_cpu_us_per_msg", "server_cpu_util", "driver_cpu_util",
       "errors", "rejected", "conns_ok", "conns_per_sec", "server_rss_bytes_per_conn",
       "kernel_slab_bytes_per_conn", "rtt_p50_us", "rtt_p99_us", "fdatasync_p50_us", "fdatasync_p99_us" ]
     | map(. as $k | [$runs[][$k] | select(. != null)] | sort
           | if length == 0 then empty else {($k): .[(length - 1) / 2 | floor]} end)
     | add // {})
    + {exactly_once: ([$runs[].exactly_once] | if all(. == null) then null else all(. == true) end)}
  )' "$results" | tee "$out/medians.json"
