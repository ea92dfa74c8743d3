#!/usr/bin/env bash
# Starts a Redis server for the peer comparison, configured for the strongest
# durability it offers per acknowledged write: AOF with `appendfsync always`
# (fdatasync before the reply, one per event-loop pass), no RDB snapshots.
#
#   bench/redis/start-redis.sh [CPU]     # CPU to pin it to (default 1)
#
# Prints shell assignments (eval them): REDIS_PORT, REDIS_PID, REDIS_DIR.
# Stop with bench/redis/stop-redis.sh "$REDIS_PID" "$REDIS_DIR".
# Installs nothing: needs `redis-server` (Debian: apt-get install redis-server).
set -euo pipefail

cpu="${1:-1}"
command -v redis-server >/dev/null || {
    echo "redis-server not found: apt-get install -y redis-server" >&2
    exit 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port=""
for _ in $(seq 1 50); do
    # Below the ephemeral range (32768+), where a flood's client sockets
    # (connected or in TIME_WAIT) would make the bind fail.
    candidate=$((20000 + RANDOM % 12000))
    if ! port_in_use "$candidate"; then
        port="$candidate"
        break
    fi
done
[ -n "$port" ] || { echo "no free loopback port found" >&2; exit 1; }

dir="$(mktemp -d "${TMPDIR:-/tmp}/iris-bench-redis.XXXXXX")"
# maxclients: the flood holds 15,000 connections (Redis's default is 10,000).
taskset -c "$cpu" redis-server \
    --bind 127.0.0.1 --port "$port" --dir "$dir" \
    --appendonly yes --appendfsync always --save '' \
    --maxclients 19000 --protected-mode yes \
    --daemonize no --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
pid=$!

for _ in $(seq 1 100); do
    if port_in_use "$port"; then
        echo "REDIS_PORT=$port"
        echo "REDIS_PID=$pid"
        echo "REDIS_DIR=$dir"
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
echo "redis-server did not come up; log: $dir/redis.log" >&2
kill "$pid" 2>/dev/null || true
exit 1
