#!/usr/bin/env bash
# Stops a Redis started by start-redis.sh and removes its data directory.
#   bench/redis/stop-redis.sh PID DIR
set -euo pipefail
pid="$1"
dir="$2"
kill "$pid" 2>/dev/null || true
for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
case "$dir" in
    */iris-bench-redis.*) rm -rf -- "$dir" ;;
    *) echo "not removing unexpected dir $dir" >&2 ;;
esac
