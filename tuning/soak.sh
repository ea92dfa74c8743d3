#!/usr/bin/env bash
# Fault rounds, long: kill -9 / SIGSTOP / SIGTERM of a pair's primary under
# load through an edge, the replica promoted, the old primary restarted as
# the replica; then the history check (nothing acknowledged lost, nothing
# twice, per-sender order). The same test as the test command runs with 50
# rounds (tests/tests/cluster.rs, fault_rounds_lose_no_acknowledged_message).
#
#   tuning/soak.sh [ROUNDS] [SEED]      (default 1000 rounds, seed: the clock)
#
# Prints the seed first (to replay a failure) and the totals last:
#   fault rounds: N (kill9 a, pause b, term c) in S s: acknowledged X, read Y, lost 0, duplicates 0, seed Z
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-1000}"
export IRIS_FAULT_ROUNDS="$rounds"
if [ -n "${2:-}" ]; then
    export IRIS_FAULT_SEED="$2"
fi
log=$(mktemp /tmp/iris-soak.XXXXXX)
set +e
cargo test --release -p tests --test cluster fault_rounds_lose_no_acknowledged_message \
    -- --exact --nocapture >"$log" 2>&1
rc=$?
set -e
grep -E '^fault rounds|panicked|test result|expected|never delivered|twice|out of order' "$log" || true
echo "full output: $log"
exit "$rc"
