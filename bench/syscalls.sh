#!/usr/bin/env bash
# System calls per proxied request: Tollgate and nginx as reverse proxies in front of the same
# nginx backend, each traced with `strace -c` while benchtool offers the same fixed load. Shows
# whether a proxy's CPU cost is in the kernel work it asks for (syscalls) or in its own code.
#
#   bench/syscalls.sh                 # 5,000 req/s over 64 connections, 3 s each
#   RATE=10000 SECS=5 bench/syscalls.sh
#
# Needs: nginx, strace, cargo. Every process it starts is stopped on exit. strace slows the
# traced process, so the counts matter here, not the times.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
RATE=${RATE:-5000}
SECS=${SECS:-3}
CONNS=${CONNS:-64}
BASE=${BENCH_PORT_BASE:-18400}
TG=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
TOOL=$ROOT/target/release/examples/benchtool

for tool in nginx strace; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx strace)" >&2; exit 1; }
done
if [ "${BUILD:-1}" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin tollgate --example benchtool)
fi

WORK=$(mktemp -d /tmp/tollgate-syscalls.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND=$BASE NGINX=$((BASE + 1)) GW=$((BASE + 2)) ADMIN=$((BASE + 3))
write_backend_conf "$WORK" "$BACKEND"
write_proxy_conf "$WORK" "$NGINX" "$BACKEND"
plain_routes_yaml "http://127.0.0.1:$BACKEND" >"$WORK/routes.yaml"

nginx -p "$WORK" -c "$WORK/backend.conf" -g 'daemon off;' &
PIDS+=($!)
nginx -p "$WORK" -c "$WORK/proxy.conf" -g 'daemon off;' &
NGINX_MASTER=$!
PIDS+=("$NGINX_MASTER")
RUST_LOG=warn "$TG" standalone --workers 1 --config "$WORK/routes.yaml" \
    --listen "127.0.0.1:$GW" --admin-listen "127.0.0.1:$ADMIN" >"$WORK/tollgate.log" 2>&1 &
TG_PID=$!
PIDS+=("$TG_PID")
for port in "$NGINX" "$GW"; do
    for _ in $(seq 1 100); do
        ss -ltnH "sport = :$port" | grep -q . && break
        sleep 0.1
    done
done
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)

# One proxy: warm its connections, then trace it under the fixed load.
measure() {
    local name=$1 pid=$2 port=$3
    timeout 60 "$TOOL" paced --addr "127.0.0.1:$port" --rate 2000 --connections "$CONNS" \
        --duration 2 --warmup 0 >/dev/null
    timeout $((SECS + 30)) strace -c -f -p "$pid" -o "$WORK/$name.strace" 2>/dev/null &
    local st=$!
    sleep 0.5
    timeout $((SECS + 30)) "$TOOL" paced --addr "127.0.0.1:$port" --rate "$RATE" \
        --connections "$CONNS" --duration "$SECS" --warmup 0 >"$WORK/$name.load"
    sleep 0.3
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    local reqs
    reqs=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' "$WORK/$name.load")
    echo "== $name: $reqs requests ($(sed -n 's/.*\(non2xx=[0-9]*\).*/\1/p' "$WORK/$name.load"))"
    awk -v n="$reqs" '
        /^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ && $NF != "total" {
            calls = $4; name = $NF
            if (calls / n >= 0.01) printf "   %-14s %8.3f per request\n", name, calls / n
            total += calls
        }
        END { printf "   %-14s %8.3f per request\n", "all", total / n }' "$WORK/$name.strace"
}

echo "System calls per request, $RATE req/s offered over $CONNS keep-alive connections, ${SECS}s"
echo "(load $(cut -d' ' -f1-3 /proc/loadavg); $(nginx -v 2>&1))"
measure tollgate "$TG_PID" "$GW"
measure nginx "$NGINX_WORKER" "$NGINX"
