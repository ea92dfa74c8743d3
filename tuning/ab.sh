#!/usr/bin/env bash
# Old against new, alternating in one run (the machine is shared and noisy):
# for each round, each binary serves `msgs --offline` at C=64 W=16 and C=1 W=1
# (S=100), a fresh server and data directory per measurement, server on CPU 1,
# driver on CPU 0; the server's fsync histogram is read from /metrics after
# each run. Floors (loopback RTT, 4 KiB write + fdatasync) before and after.
#
#   OLD=dir/with/old/binaries NEW=dir/with/new/binaries tuning/ab.sh [ROUNDS] [OUT] [DURATION]
#
# Writes OUT (default /tmp/iris-ab.jsonl): one iris-bench JSON object per line
# with a "label" (old-64x16, new-1x1, ...), "<label>-fsync" lines with the
# histogram, and "floor" lines. Needs jq and curl.
set -euo pipefail
rounds="${1:-3}"
out="${2:-/tmp/iris-ab.jsonl}"
duration="${3:-10s}"
: "${OLD:?OLD=dir of the old iris}" "${NEW:?NEW=dir of the new iris and iris-bench}"
bench="$NEW/iris-bench"
: >"$out"
run() {
    local label=$1 bin=$2
    shift 2
    local d
    d=$(mktemp -d /tmp/iris-ab.XXXXXX)
    MIMALLOC_ALLOW_THP=0 taskset -c 1 "$bin/iris" serve --listen 127.0.0.1:0 --data "$d/data" \
        --cores 1 --inbox-len-max 1000000 --admin 127.0.0.1:0 >"$d/out" 2>"$d/err" </dev/null &
    local pid=$! addr="" admin=""
    for _ in $(seq 1 100); do
        addr=$(sed -n 's/^iris listening on //p' "$d/out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    sleep 0.5
    admin=$(sed -n 's/^iris admin listening on //p' "$d/out")
    taskset -c 0 "$bench" msgs --addr "$addr" --server-pid "$pid" --json "$@" |
        jq -c --arg l "$label" '. + {label: $l}' >>"$out"
    curl -s "http://$admin/metrics" | grep '^iris_fsync_latency_seconds_bucket' | tr '\n' ' ' |
        jq -R -c --arg l "$label" '{label: ($l + "-fsync"), buckets: .}' >>"$out"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$d"
}
taskset -c 0 "$bench" floor --dir /tmp --json | jq -c '. + {label: "floor"}' >>"$out"
for _ in $(seq 1 "$rounds"); do
    for v in old new; do
        bin=$OLD
        [ "$v" = new ] && bin=$NEW
        run "$v-64x16" "$bin" --offline --conns 64 --inflight 16 --size 100 --duration "$duration"
        [ -n "${SKIP_C1:-}" ] || run "$v-1x1" "$bin" --offline --conns 1 --inflight 1 --size 100 --duration "$duration"
    done
done
taskset -c 0 "$bench" floor --dir /tmp --json | jq -c '. + {label: "floor"}' >>"$out"
