#!/usr/bin/env bash
# Records a CPU flamegraph of `iris serve` (pinned to CPU 1) while
# `iris-bench` (pinned to CPU 0) loads it.
#
#   tuning/flamegraph.sh OUT_DIR [SECONDS] -- IRIS_BENCH_ARGS...
#   tuning/flamegraph.sh /tmp/fg 5 -- msgs --offline --conns 64 --inflight 16 --size 100
#
# Writes OUT_DIR/iris.svg (the flamegraph), OUT_DIR/top.txt (the hottest
# functions, self time) and OUT_DIR/bench.json (what the driver measured).
# Builds with the `profiling` profile (release + debug info). Needs perf and
# inferno (cargo install inferno). The driver runs SECONDS + 3 s; perf samples
# the server for SECONDS after a 1 s warm-up.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/tuning/common.sh"

out="${1:?usage: tuning/flamegraph.sh OUT_DIR [SECONDS] -- IRIS_BENCH_ARGS...}"
shift
seconds=5
if [ "${1:-}" != "--" ] && [ -n "${1:-}" ]; then seconds="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
[ "$#" -gt 0 ] || set -- msgs --offline --conns 64 --inflight 16 --size 100
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "$tool not found (perf: apt-get install linux-perf; inferno: cargo install inferno)" >&2; exit 1; }
done
mkdir -p "$out"
build_profiling
start_iris
trap stop_iris EXIT

taskset -c "$DRIVER_CPU" "$BENCH" "$@" --addr "$IRIS_ADDR" --server-pid "$IRIS_PID" \
    --warmup 1s --duration "$((seconds + 2))s" --json >"$out/bench.json" &
bench_pid=$!
sleep 1
# DWARF unwinding: release Rust code has no frame pointers. cpu-clock works
# in VMs without hardware counters.
perf record -e cpu-clock -F 997 --call-graph dwarf,16384 -p "$IRIS_PID" \
    -o "$out/perf.data" -- sleep "$seconds" 2>"$out/perf-record.log"
wait "$bench_pid"
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf >"$out/folded.txt"
inferno-flamegraph --title "iris serve under iris-bench $*" <"$out/folded.txt" >"$out/iris.svg"
# Where the time goes: by thread, then the hottest functions (self time).
{
    echo "== by thread and object =="
    perf report -i "$out/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | sed -n '1,12p' || true
    echo "== hottest functions (self) =="
    perf report -i "$out/perf.data" --no-children --sort comm,symbol --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | sed -n '1,40p' || true
} >"$out/top.txt"
echo "flamegraph: $out/iris.svg"
sed -n '1,30p' "$out/top.txt"
echo "driver: $(cat "$out/bench.json")"
