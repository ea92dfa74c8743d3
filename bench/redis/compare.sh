#!/usr/bin/env bash
# The Redis side of BENCHMARKS.md, rerunnable: starts Redis (AOF,
# appendfsync always) pinned to CPU 1, drives it from CPU 0 with the same
# shapes as Iris, prints one JSON object per run, and stops it.
#
#   bench/redis/compare.sh [RUNS]        # default 3 runs of each shape
#
# Needs redis-server (apt-get install -y redis-server) and a release build of
# iris-bench (cargo build --release -p bench --bin iris-bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-3}"
bench=./target/release/iris-bench
[ -x "$bench" ] || { echo "build first: cargo build --release -p bench --bin iris-bench" >&2; exit 1; }

eval "$(bench/redis/start-redis.sh 1)"
trap 'bench/redis/stop-redis.sh "$REDIS_PID" "$REDIS_DIR"' EXIT
addr="127.0.0.1:$REDIS_PORT"

for _ in $(seq 1 "$runs"); do
    taskset -c 0 "$bench" msgs --proto redis --addr "$addr" --conns 64 --inflight 16 \
        --size 100 --duration 10s --server-pid "$REDIS_PID" --json
done
for _ in $(seq 1 "$runs"); do
    taskset -c 0 "$bench" msgs --proto redis --addr "$addr" --conns 1 --inflight 1 \
        --size 100 --duration 10s --server-pid "$REDIS_PID" --json
done
taskset -c 0 "$bench" flood --proto redis --addr "$addr" --conns 15000 --rate 5000 \
    --hold 5s --server-pid "$REDIS_PID" --json
