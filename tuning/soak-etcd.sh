#!/usr/bin/env bash
# Fault rounds with automatic failover through a real etcd, long: kill -9,
# SIGSTOP past the lease, SIGTERM and power cuts (kill -9 and the log cut
# back to its last fsync) of a pair's primary under load through an edge;
# nobody promotes: the replica is elected, the old primary comes back as
# its replica. Then the history check (nothing acknowledged lost, nothing
# twice, per-sender order). The test command runs the same test with 50
# rounds (tests/tests/cluster.rs, etcd_fault_rounds_lose_no_acknowledged_message).
#
#   tuning/soak-etcd.sh [ROUNDS] [SEED]      (default 1000 rounds, seed: the clock)
#
# Prints the seed first (to replay a failure) and the totals last:
#   etcd fault rounds: N (kill9 a, pause b, term c, power cut d with R unsynced records cut) in S s: acknowledged X, read Y, lost 0, duplicates 0, seed Z
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-1000}"
export IRIS_ETCD_FAULT_ROUNDS="$rounds"
if [ -n "${2:-}" ]; then
    export IRIS_FAULT_SEED="$2"
fi
log=$(mktemp /tmp/iris-soak-etcd.XXXXXX)
set +e
cargo test --release -p tests --test cluster etcd_fault_rounds_lose_no_acknowledged_message \
    -- --exact --nocapture >"$log" 2>&1
rc=$?
set -e
grep -E '^etcd fault rounds|panicked|test result|expected|never delivered|twice|out of order' "$log" || true
echo "full output: $log"
exit "$rc"
