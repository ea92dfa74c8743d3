#!/usr/bin/env bash
# The security figures of BENCHMARKS.md (issue 10), in one run, server on
# CPU 1 and driver on CPU 0, a fresh one-core server per measurement:
#
#   - idle bytes per connection at 15,000 connections, plain and TLS;
#   - msgs offline C=64 W=16 S=100, plain and TLS, alternated ROUNDS times;
#   - full TLS handshakes per second on one core (flood at full speed over
#     TLS, --auth none) against plain connects, with the server's CPU per
#     connection;
#   - HELLOs per second with EdDSA verification on one core (flood at full
#     speed, every user its own token, --auth jwt) against --auth none.
#
#   tuning/security-bench.sh [ROUNDS] [OUT]    # default 3, /tmp/iris-security.jsonl
#
# Writes one iris-bench JSON object per line with a "label" (and, for the
# connect-rate runs, "server_cpu_s" read from /proc/PID/stat). Needs jq.
# BIN_DIR=dir uses prebuilt iris and iris-bench (else builds release).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"
rounds="${1:-3}"
out="${2:-/tmp/iris-security.jsonl}"
PROFILE="${PROFILE:-release}" build_profiling
: >"$out"
material="$(mktemp -d "${TMPDIR:-/tmp}/iris-security.XXXXXX")"
trap 'stop_iris; rm -rf "$material"' EXIT
"$IRIS" certs --out "$material/certs" >/dev/null
"$IRIS" keygen --out "$material/keys" >/dev/null
TLS_ARGS=(--tls-listen 127.0.0.1:0 --tls-cert "$material/certs/server.pem" --tls-key "$material/certs/server.key")
JWT_ARGS=(--auth jwt --jwt-keys "$material/keys")
CLIENT_TLS=(--tls-ca "$material/certs/ca.pem")
CLIENT_JWT=(--token-key "$material/keys/iris.key")

record() { jq -c --arg l "$1" '. + {"label": $l}' >>"$out"; }
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
tls_addr() { sed -n 's/^iris tls listening on //p' "$IRIS_DATA/stdout"; }

# label, server args (array name), client args (array name), "tls"|"plain", iris-bench args...
run() {
    local label="$1" server="$2[@]" client="$3[@]" via="$4"
    shift 4
    start_iris --inbox-len-max 1000000 "${!server}"
    local addr="$IRIS_ADDR"
    if [ "$via" = tls ]; then
        for _ in $(seq 1 50); do addr="$(tls_addr)"; [ -n "$addr" ] && break; sleep 0.1; done
    fi
    # The spare WAL segment is mapped a few seconds after start: let it land
    # before a flood reads its baseline RSS.
    if [ "$1" = flood ]; then sleep 5; fi
    local before after
    before="$(cpu_s "$IRIS_PID")"
    taskset -c "$DRIVER_CPU" "$BENCH" "$@" "${!client}" --addr "$addr" --server-pid "$IRIS_PID" --json >"$IRIS_DATA/result"
    after="$(cpu_s "$IRIS_PID")"
    jq -c --argjson cpu "$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}')" '. + {server_cpu_s: $cpu}' "$IRIS_DATA/result" | record "$label"
    stop_iris
}

NONE=()
PLAIN_SERVER=()
TLS_SERVER=("${TLS_ARGS[@]}")
JWT_SERVER=("${JWT_ARGS[@]}")
for round in $(seq 1 "$rounds"); do
    echo "round $round of $rounds" >&2
    taskset -c 0,1 "$BENCH" floor --dir "${TMPDIR:-/tmp}" --json | record floor
    run "plain flood 15000" PLAIN_SERVER NONE plain flood --conns 15000 --rate 5000 --hold 5s
    run "tls flood 15000" TLS_SERVER CLIENT_TLS tls flood --conns 15000 --rate 5000 --hold 5s
    run "plain msgs offline C=64 W=16" PLAIN_SERVER NONE plain msgs --offline --conns 64 --inflight 16 --size 100 --duration 10s
    run "tls msgs offline C=64 W=16" TLS_SERVER CLIENT_TLS tls msgs --offline --conns 64 --inflight 16 --size 100 --duration 10s
    run "plain connects/s" PLAIN_SERVER NONE plain flood --conns 5000 --rate 0 --hold 1s --settle 1s
    run "tls handshakes/s" TLS_SERVER CLIENT_TLS tls flood --conns 5000 --rate 0 --hold 1s --settle 1s
    run "jwt hellos/s" JWT_SERVER CLIENT_JWT plain flood --conns 5000 --rate 0 --hold 1s --settle 1s
done
jq -s -r '
  group_by(.label) | map(
    . as $r | {label: $r[0].label, runs: ($r | length)} +
    ([ "stored_per_sec", "ack_p50_us", "ack_p99_us", "ack_p999_us", "server_cpu_us_per_msg",
       "server_cpu_util", "conns_ok", "conns_per_sec", "connect_s", "server_cpu_s",
       "server_rss_bytes_per_conn", "rtt_p50_us", "fdatasync_p50_us" ]
     | map(. as $k | [$r[][$k] | select(. != null)] | sort
           | if length == 0 then empty else {($k): .[(length - 1) / 2 | floor]} end)
     | add // {})
  )' "$out"
