# Shared by the tuning scripts: build, start a pinned `iris serve` on a free
# loopback port with a scratch data directory, and stop it again.
# Sourced, not run. Expects ROOT (the repository) to be set.

SERVER_CPU="${SERVER_CPU:-1}"
DRIVER_CPU="${DRIVER_CPU:-0}"

# PROFILE picks the cargo profile (default `profiling`: release with debug
# info, so perf can name inlined frames too); BIN_DIR=dir skips the build and
# uses the binaries already in that directory.
build_profiling() {
    local profile="${PROFILE:-profiling}"
    if [ -z "${BIN_DIR:-}" ]; then
        (cd "$ROOT" && cargo build --profile "$profile" -p engine --bin iris -p bench --bin iris-bench) >&2
        BIN_DIR="$ROOT/target/$profile"
    fi
    IRIS="$BIN_DIR/iris"
    BENCH="$BIN_DIR/iris-bench"
}

# Starts iris pinned to SERVER_CPU (extra arguments go to `iris serve`);
# sets IRIS_PID, IRIS_ADDR, IRIS_DATA.
start_iris() {
    IRIS_DATA="$(mktemp -d "${TMPDIR:-/tmp}/iris-tuning.XXXXXX")"
    local out="$IRIS_DATA/stdout"
    MIMALLOC_ALLOW_THP=0 taskset -c "$SERVER_CPU" "$IRIS" serve --listen 127.0.0.1:0 \
        --data "$IRIS_DATA/data" --cores 1 "$@" >"$out" 2>"$IRIS_DATA/stderr" </dev/null &
    IRIS_PID=$!
    for _ in $(seq 1 100); do
        IRIS_ADDR="$(sed -n 's/^iris listening on //p' "$out")"
        [ -n "$IRIS_ADDR" ] && return 0
        kill -0 "$IRIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "iris did not start; stderr:" >&2
    cat "$IRIS_DATA/stderr" >&2
    return 1
}

stop_iris() {
    [ -n "${IRIS_PID:-}" ] && kill "$IRIS_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$IRIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    case "${IRIS_DATA:-}" in
        */iris-tuning.*) rm -rf -- "$IRIS_DATA" ;;
    esac
}
