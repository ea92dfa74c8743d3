#!/usr/bin/env bash
# One-command `perf stat` summary of `iris serve` (CPU 1) under an
# `iris-bench msgs` load (CPU 0), per acknowledged message.
#
#   tuning/perf-stat.sh [SECONDS] [-- IRIS_BENCH_MSGS_ARGS...]
#   tuning/perf-stat.sh 10 -- --offline --conns 64 --inflight 16 --size 100
#
# Prints cycles, instructions (where the CPU exposes counters: not in most
# VMs, this one included), task-clock, context switches and page faults, in
# total and per STORED message. Builds with the `profiling` profile.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"

seconds=10
if [ "${1:-}" != "--" ] && [ -n "${1:-}" ]; then seconds="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
[ "$#" -gt 0 ] || set -- --offline --conns 64 --inflight 16 --size 100
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }
build_profiling
start_iris
trap stop_iris EXIT
tmp="$IRIS_DATA"

# The driver measures for exactly `seconds` after a 1 s warm-up; perf counts
# the server over the same window.
taskset -c "$DRIVER_CPU" "$BENCH" msgs "$@" --addr "$IRIS_ADDR" --server-pid "$IRIS_PID" \
    --warmup 1s --duration "${seconds}s" --json >"$tmp/bench.json" &
bench_pid=$!
sleep 1
perf stat -x, -e cycles,instructions,task-clock,context-switches,cpu-migrations,page-faults \
    -p "$IRIS_PID" -o "$tmp/stat.csv" -- sleep "$seconds"
wait "$bench_pid"

msgs="$(jq '.stored' "$tmp/bench.json")"
echo "iris-bench msgs $* : $(jq -r '"\(.stored_per_sec|floor) STORED/s, ack p50 \(.ack_p50_us) us, p99 \(.ack_p99_us) us"' "$tmp/bench.json")"
echo "server counters over ${seconds}s, ${msgs} messages:"
awk -F, -v msgs="$msgs" '
    /^#/ || NF < 3 { next }
    {
        value = $1; event = $3
        if (value ~ /not (supported|counted)/) { printf "  %-18s %s\n", event, value; next }
        if (event ~ /task-clock/) {
            printf "  %-18s %16.1f ms  %9.3f us per message\n", event, value, value * 1000 / msgs
        } else {
            printf "  %-18s %16.0f  %12.4f per message\n", event, value, value / msgs
        }
    }' "$tmp/stat.csv"
