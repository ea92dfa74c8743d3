#!/usr/bin/env bash
# Fault rounds with automatic failover through a real etcd, long, on the
# whole fault set: kill -9, SIGSTOP past the lease, SIGTERM, power cuts
# (kill -9 and the log cut back to its last fsync), and network partitions
# in namespaces (the primary cut from everyone, from etcd only, from its
# replica only, from the edge only both ways or one way), under load
# through an edge; nobody promotes. IRIS_PARTITION_FAULTS=7,8 (numbers in
# the order of the totals, from 0) draws only those faults. Then the
# history check (nothing acknowledged lost, nothing twice, per-sender
# order). The test command runs the same test with 30 rounds
# (tests/tests/cluster.rs, etcd_partitions_and_faults_lose_no_acknowledged_message).
# Needs root (namespaces) and installs etcd-server with apt-get if missing.
#
#   tuning/soak-etcd.sh [ROUNDS] [SEED]      (default 1000 rounds, seed: the clock)
#
# Prints the seed first (to replay a failure) and the totals last:
#   partition rounds: N (kill9 a, pause b, ...; R unsynced records cut) in S s: acknowledged X, read Y, lost 0, duplicates 0, seed Z
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-1000}"
export IRIS_PARTITION_ROUNDS="$rounds"
if [ -n "${2:-}" ]; then
    export IRIS_FAULT_SEED="$2"
fi
log=$(mktemp /tmp/iris-soak-etcd.XXXXXX)
set +e
cargo test --release -p tests --test cluster etcd_partitions_and_faults_lose_no_acknowledged_message \
    -- --exact --nocapture >"$log" 2>&1
rc=$?
set -e
grep -E '^partition rounds|panicked|test result|expected|never delivered|twice|out of order' "$log" || true
echo "full output: $log"
exit "$rc"
