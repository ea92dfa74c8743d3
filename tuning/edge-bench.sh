#!/usr/bin/env bash
# The edge figures of BENCHMARKS.md, from one `iris dev-cluster --pairs 1
# --edges 1` (the pair's two nodes and the edge pinned to SERVER_CPU, the
# driver to DRIVER_CPU). Every measurement on a fresh cluster (a pair's first
# run is faster than its second), edge and direct in turn, which goes first
# alternating by run:
#   msgs --offline C=64 W=16 S=100 through the edge / straight to the primary
#   msgs --offline C=1 W=1 S=100 through the edge / straight to the primary
# then once: flood 15,000 idle connections on the edge (user-space bytes per
# connection), and failover-bench (promotion to the first STORED, 20 rounds).
#
#   tuning/edge-bench.sh [RUNS] [OUT_DIR]     # default 3 runs, /tmp/iris-edge
#
# Writes OUT_DIR/results.jsonl and prints the median of each figure. Needs jq.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"

runs="${1:-3}"
out="${2:-/tmp/iris-edge}"
duration="${DURATION:-10s}"
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }
PROFILE="${PROFILE:-release}" build_profiling
(cd "$ROOT" && cargo build --profile "${PROFILE:-release}" -p bench --bin failover-bench) >&2
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

start_cluster() {
    rm -rf "$out/cluster" "$out/cluster.json"
    MIMALLOC_ALLOW_THP=0 taskset -c "$SERVER_CPU" "$IRIS" dev-cluster --pairs 1 --edges 1 \
        --dir "$out/cluster" -- --inbox-len-max 1000000 >"$out/cluster.json" 2>"$out/cluster.err" &
    CLUSTER_PID=$!
    for _ in $(seq 1 300); do
        [ -s "$out/cluster.json" ] && break
        sleep 0.1
    done
    [ -s "$out/cluster.json" ] || { echo "the cluster did not start:" >&2; cat "$out/cluster.err" >&2; exit 1; }
    EDGE_ADDR="$(head -1 "$out/cluster.json" | jq -r '.edges[0].client')"
    EDGE_PID="$(head -1 "$out/cluster.json" | jq -r '.edges[0].pid')"
    CORE_ADDR="$(head -1 "$out/cluster.json" | jq -r '.pairs[0].nodes[0].client')"
    CORE_PID="$(head -1 "$out/cluster.json" | jq -r '.pairs[0].nodes[0].pid')"
    CORE_ADMIN="$(head -1 "$out/cluster.json" | jq -r '.pairs[0].nodes[0].admin')"
}

stop_cluster() {
    kill "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
    sleep 1 # the nodes' listeners and memory are gone before the next start
}

run() {
    local label="$1" addr="$2" pid="$3"
    shift 3
    taskset -c "$DRIVER_CPU" "$BENCH" msgs --addr "$addr" --server-pid "$pid" --json "$@" \
        | jq -c --arg l "$label" '. + {"label": $l}' >>"$results"
}

for r in $(seq 1 "$runs"); do
    echo "run $r/$runs" >&2
    if [ $((r % 2)) -eq 1 ]; then order="edge core"; else order="core edge"; fi
    for shape in c64 c1; do
        for side in $order; do
            # A fresh cluster per measurement: a pair's first run is faster
            # than its second (empty WAL and inboxes), whichever side it is.
            start_cluster
            if [ "$side" = edge ]; then addr="$EDGE_ADDR" pid="$EDGE_PID"; else addr="$CORE_ADDR" pid="$CORE_PID"; fi
            if [ "$shape" = c64 ]; then flags="--conns 64 --inflight 16"; else flags="--conns 1 --inflight 1"; fi
            # shellcheck disable=SC2086
            run "$side-$shape" "$addr" "$pid" --offline $flags --size 100 --duration "$duration"
            stop_cluster
        done
    done
done

# Idle connections on a fresh edge, then on the pair's primary (same cluster).
for r in $(seq 1 "$runs"); do
    start_cluster
    taskset -c "$DRIVER_CPU" "$BENCH" flood --addr "$EDGE_ADDR" --conns 15000 --rate 5000 --hold 5 \
        --server-pid "$EDGE_PID" --json | jq -c '. + {"label": "edge-idle"}' >>"$results"
    taskset -c "$DRIVER_CPU" "$BENCH" flood --addr "$CORE_ADDR" --conns 15000 --rate 5000 --hold 5 \
        --server-pid "$CORE_PID" --json | jq -c '. + {"label": "core-idle"}' >>"$results"
    stop_cluster
done

taskset -c "$SERVER_CPU" "$BIN_DIR/failover-bench" --iris "$IRIS" --rounds "${ROUNDS:-20}" \
    --dir "$out/failover" --json | jq -c '. + {"label": "failover"}' >>"$results"

median() { jq -s "[.[] | select(.label == \"$1\") | .$2] | sort | .[length/2|floor]" "$results"; }
for l in edge-c64 core-c64 edge-c1 core-c1; do
    echo "$l: stored/s $(median $l stored_per_sec) ack p50 $(median $l ack_p50_us) µs p99 $(median $l ack_p99_us) µs server cpu/msg $(median $l server_cpu_us_per_msg) µs"
done
for l in edge-idle core-idle; do
    echo "$l: user-space bytes per idle connection $(median $l server_rss_bytes_per_conn) (conns_ok $(median $l conns_ok))"
done
echo "failover: $(jq -s '[.[] | select(.label == "failover")][0]' "$results")"
