#!/usr/bin/env bash
# Profiles Tollgate's per-request path: a fixed number of proxied requests under callgrind
# (instruction counts: deterministic, so usable on a shared, noisy machine; this VM exposes no
# hardware counters to perf), or under `perf record -e cpu-clock` (wall-clock samples, kernel
# included) with PROFILER=perf.
#
#   bench/profile.sh                   # plain proxying, access log off
#   VARIANT=p2 bench/profile.sh        # key auth + rate limits + least connections
#   RUST_LOG=info bench/profile.sh     # with the access log
#   PROFILER=perf bench/profile.sh
#   VARIANT=nginx bench/profile.sh     # the peer: nginx as the reverse proxy, same load
#
# Prints instructions per request and the top functions; leaves the raw profile in $OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
VARIANT=${VARIANT:-plain}
PROFILER=${PROFILER:-callgrind}
REQUESTS_RATE=${RATE:-500}
SECONDS_MEASURED=${SECS:-10}
BASE=${BENCH_PORT_BASE:-18100}
OUT=${OUT:-/tmp/tollgate-profile-$VARIANT}
TG=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
TOOL=$ROOT/target/release/examples/benchtool
export RUST_LOG=${RUST_LOG:-warn}

WORK=$(mktemp -d /tmp/tollgate-profile.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$OUT"
write_backend_conf "$WORK" "$BASE"
nginx -p "$WORK" -c "$WORK/backend.conf" -g 'daemon off;' &
PIDS+=($!)

HEADER=()
if [ "$VARIANT" = p2 ]; then
    p2_routes_yaml "http://127.0.0.1:$BASE" >"$WORK/routes.yaml"
    HEADER=(--header "x-api-key: bench-key-0001")
else
    plain_routes_yaml "http://127.0.0.1:$BASE" >"$WORK/routes.yaml"
fi

GW=$((BASE + 1))
ARGS=(standalone --workers 1 --config "$WORK/routes.yaml" --listen "127.0.0.1:$GW"
    --admin-listen "127.0.0.1:$((BASE + 2))")
if [ "$VARIANT" = nginx ]; then
    # The peer, profiled the same way: nginx as the reverse proxy (one process, 256 idle
    # upstream connections, as in bench/run.sh).
    write_proxy_conf "$WORK" "$GW" "$BASE" "" "master_process off;
daemon off;"
    TG=$(command -v nginx)
    ARGS=(-p "$WORK" -c "$WORK/proxy.conf")
fi
case "$PROFILER" in
callgrind)
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" --dump-instr=no \
        "$TG" "${ARGS[@]}" >"$OUT/tollgate.log" 2>"$OUT/valgrind.log" &
    ;;
perf)
    "$TG" "${ARGS[@]}" >"$OUT/tollgate.log" 2>&1 &
    ;;
esac
TG_PID=$!
PIDS+=("$TG_PID")
for _ in $(seq 1 300); do
    ss -ltnH "sport = :$GW" | grep -q . && break
    sleep 0.1
done

# Warm-up (connections, pools), then zero the counters and measure a fixed request count.
timeout 120 "$TOOL" paced --addr "127.0.0.1:$GW" "${HEADER[@]}" --rate 200 --connections 16 \
    --duration 2 --warmup 0 >/dev/null
case "$PROFILER" in
callgrind)
    callgrind_control --zero "$TG_PID" >/dev/null
    timeout 300 "$TOOL" paced --addr "127.0.0.1:$GW" "${HEADER[@]}" --rate "$REQUESTS_RATE" \
        --connections 16 --duration "$SECONDS_MEASURED" --warmup 0 | tee "$OUT/load.txt"
    kill -TERM "$TG_PID"
    wait "$TG_PID" || true
    REQS=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' "$OUT/load.txt")
    # The final dump holds the measured part plus the shutdown (negligible).
    IR=$(callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    echo "instructions per request: $((IR / REQS)) ($IR instructions, $REQS requests)"
    callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | head -80 >"$OUT/inclusive.txt"
    callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -70 >"$OUT/self.txt"
    echo "top functions: $OUT/inclusive.txt, $OUT/self.txt"
    ;;
perf)
    perf record -e cpu-clock -F 2999 -g -p "$TG_PID" -o "$OUT/perf.data" -- sleep "$SECONDS_MEASURED" \
        >/dev/null 2>&1 &
    PERF_PID=$!
    timeout 300 "$TOOL" paced --addr "127.0.0.1:$GW" "${HEADER[@]}" --rate "$REQUESTS_RATE" \
        --connections 64 --duration "$SECONDS_MEASURED" --warmup 0 | tee "$OUT/load.txt"
    wait "$PERF_PID" || true
    perf report -i "$OUT/perf.data" --no-children --percent-limit 0.7 --stdio 2>/dev/null |
        grep -v '^$' | head -120 >"$OUT/perf-self.txt"
    echo "samples: $OUT/perf-self.txt"
    ;;
esac
