#!/usr/bin/env bash
# Edge throughput with plain node links against mutual-TLS node links
# (BENCHMARKS.md, "edges and core pairs"): per measurement a fresh
# `iris dev-cluster --pairs 1 --edges 1 [--mtls]` pinned to SERVER_CPU, then
# `iris-bench msgs --offline` C=64 W=16 S=100 through the edge (driver on
# DRIVER_CPU), plain and mTLS alternating which goes first.
#
#   tuning/edge-mtls-bench.sh [RUNS] [OUT_DIR]     # default 3 runs, /tmp/iris-mtls
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"
runs="${1:-3}"
out="${2:-/tmp/iris-mtls}"
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }
PROFILE="${PROFILE:-release}" build_profiling
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

one() {
    local label="$1"
    shift
    rm -rf "$out/c" "$out/c.json"
    MIMALLOC_ALLOW_THP=0 taskset -c "$SERVER_CPU" "$IRIS" dev-cluster --pairs 1 --edges 1 \
        --dir "$out/c" "$@" -- --inbox-len-max 1000000 >"$out/c.json" 2>"$out/c.err" &
    local pid=$!
    for _ in $(seq 1 300); do [ -s "$out/c.json" ] && break; sleep 0.1; done
    [ -s "$out/c.json" ] || { cat "$out/c.err" >&2; exit 1; }
    local edge edge_pid
    edge="$(head -1 "$out/c.json" | jq -r '.edges[0].client')"
    edge_pid="$(head -1 "$out/c.json" | jq -r '.edges[0].pid')"
    taskset -c "$DRIVER_CPU" "$BENCH" msgs --addr "$edge" --server-pid "$edge_pid" --offline \
        --conns 64 --inflight 16 --size 100 --duration "${DURATION:-10s}" --json \
        | jq -c --arg l "$label" '. + {label: $l}' >>"$results"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    sleep 1
}

for r in $(seq 1 "$runs"); do
    if [ $((r % 2)) -eq 1 ]; then one plain; one mtls --mtls; else one mtls --mtls; one plain; fi
done
median() { jq -s "[.[] | select(.label == \"$1\") | .$2] | sort | .[length/2|floor]" "$results"; }
for l in plain mtls; do
    echo "$l: stored/s $(median $l stored_per_sec) ack p50 $(median $l ack_p50_us) µs edge cpu/msg $(median $l server_cpu_us_per_msg) µs"
done
