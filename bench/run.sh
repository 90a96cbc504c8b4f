#!/usr/bin/env bash
# The load benchmark of shared/design/targets.md (P1-P3, P6 file part, P7-P9), in one run on
# loopback: a fast backend (nginx answering a small fixed body), nginx as a reverse proxy (1 worker,
# 256 idle upstream connections), and Tollgate (`standalone --workers 1`), driven in alternation
# with wrk. Speed is reported as ratios against nginx measured in the same round.
#
#   bench/run.sh                      # everything, about 10 minutes
#   PHASES="p1 p3" ROUNDS=2 DURATION=5 bench/run.sh
#
# Needs: nginx, wrk (apt-get install -y nginx wrk), python3, cargo. Every process it starts is
# stopped on exit; every step is bounded in time. See BENCHMARKS.md for what each figure means.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PHASES=${PHASES:-"p1 p3 p7 p8 p9 p6"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-"64 256"}
BASE=${BENCH_PORT_BASE:-18000}
SSE_STREAMS=${SSE_STREAMS:-10000}
BUILD=${BUILD:-1}
TG=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
TOOL=$ROOT/target/release/examples/benchtool

WORK=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
RESULTS=$WORK/results.tsv
SUMMARY=${SUMMARY:-$WORK/summary.txt}
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    sleep 0.3
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        # Keep the summary; drop logs and configuration.
        [ -f "$SUMMARY" ] && [ "$SUMMARY" = "$WORK/summary.txt" ] && cp "$SUMMARY" "/tmp/tollgate-bench-last.txt"
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "$*" | tee -a "$SUMMARY"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

for tool in nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx wrk)" >&2; exit 1; }
done

# A stream through the gateway holds two sockets (client and upstream): the hard descriptor limit
# bounds how many the gateway can hold.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin tollgate --example benchtool >&2)
fi

for p in $(seq "$BASE" $((BASE + 20))); do
    if ss -ltnH "sport = :$p" | grep -q .; then
        echo "port $p is busy; set BENCH_PORT_BASE" >&2
        exit 1
    fi
done

# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------

BACKEND=$BASE                 # nginx, small fixed body
NGINX=$((BASE + 1))           # nginx reverse proxy
TG_PLAIN=$((BASE + 2))        # tollgate, access log off
TG_LOG=$((BASE + 3))          # tollgate, access log on (to a file)
TG_P2=$((BASE + 4))           # tollgate, key auth + rate limits + least connections
SSE_BACKEND=$((BASE + 5))
TG_SSE=$((BASE + 6))          # P7
TG_CHURN=$((BASE + 7))        # P9, P6
TG_HOLD=$((BASE + 8))         # P8 (fresh, for a clean RSS baseline)
TG_BASE=$((BASE + 9))         # optional: another tollgate binary (BASELINE_BIN), log off
BASELINE_BIN=${BASELINE_BIN:-}

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if ss -ltnH "sport = :$port" | grep -q .; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $port after 10 s" >&2
    exit 1
}

start_nginx() {
    mkdir -p "$WORK/nginx"
    write_backend_conf "$WORK/nginx" "$BACKEND"
    write_proxy_conf "$WORK/nginx" "$NGINX" "$BACKEND" "$SSE_BACKEND"
    nginx -p "$WORK/nginx" -c "$WORK/nginx/backend.conf" -g 'daemon off;' &
    PIDS+=($!)
    nginx -p "$WORK/nginx" -c "$WORK/nginx/proxy.conf" -g 'daemon off;' &
    PIDS+=($!)
    NGINX_PROXY_PID=$!
    wait_port "$BACKEND"
    wait_port "$NGINX"
}

# start_tollgate NAME PORT ADMIN_PORT RUST_LOG CONFIG_PATH [BINARY]
start_tollgate() {
    local name=$1 port=$2 admin=$3 log=$4 config=$5 bin=${6:-$TG}
    RUST_LOG=$log "$bin" standalone --workers 1 --config "$config" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$name=$!"
    wait_port "$port"
}

write_configs() {
    mkdir -p "$WORK/plain" "$WORK/p2" "$WORK/sse" "$WORK/churn"
    plain_routes_yaml "http://127.0.0.1:$BACKEND" >"$WORK/plain/routes.yaml"
    p2_routes_yaml "http://127.0.0.1:$BACKEND" >"$WORK/p2/routes.yaml"
    route_yaml sse /sse "http://127.0.0.1:$SSE_BACKEND" "  protocol: sse
  auth:
    required: false" >"$WORK/sse/routes.yaml"
    write_churn_config
}

write_churn_config() {
    route_yaml churn /churn "http://127.0.0.1:$BACKEND" "  auth:
    required: false" >"$WORK/churn/.routes.yaml.tmp"
    mv "$WORK/churn/.routes.yaml.tmp" "$WORK/churn/routes.yaml"
}

# ------------------------------------------------------------------------------------------------
# wrk runs
# ------------------------------------------------------------------------------------------------

to_us() { # wrk's "512.00us" / "1.23ms" / "2.00s" -> microseconds
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.0f", v }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.0f", v * 1000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.0f", v * 1000000 }
        else printf "0" }'
}

# run_wrk LABEL CONNS ROUND SECONDS URL [wrk args...]: appends a line to $RESULTS
run_wrk() {
    local label=$1 conns=$2 round=$3 secs=$4 url=$5
    shift 5
    local out="$WORK/wrk-$label-$conns-$round.txt"
    timeout $((secs + 30)) wrk -t1 -c"$conns" -d"${secs}s" --latency "$@" "$url" >"$out" 2>&1 || true
    local rps p50 p99 non2xx sock
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
    sock=$(awk -F'[ ,]+' '/Socket errors/ {print $4 + $6 + $8 + $10}' "$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$conns" "$round" "${rps:-0}" \
        "${p50:-0}" "${p99:-0}" "${non2xx:-0}" "${sock:-0}" "$(load)" >>"$RESULTS"
    printf '  %-10s c=%-3s round %s: %10s req/s  p50 %6s us  p99 %6s us  non2xx %s  sockerr %s  (load %s)\n' \
        "$label" "$conns" "$round" "${rps:-0}" "${p50:-0}" "${p99:-0}" "${non2xx:-0}" "${sock:-0}" "$(load)"
}

P2_KEY=(-H "x-api-key: bench-key-0001")

phase_p1() {
    say ""
    say "== P1/P2: closed-loop throughput (wrk -t1, ${DURATION}s x $ROUNDS rounds, alternating) =="
    say "   targets: direct backend, nginx proxy, tollgate (log off), tollgate (access log on, to a"
    say "   file), tollgate P2 (key auth + 2 rate-limit buckets + least connections; log off)"
    local c r
    for c in $CONNS; do
        # Warm-up: connections, pools, caches.
        for t in "direct $BACKEND" "nginx $NGINX" "tg $TG_PLAIN" "tg-log $TG_LOG" "tg-p2 $TG_P2" ${BASELINE_BIN:+"base $TG_BASE"}; do
            set -- $t
            local extra=()
            [ "$1" = tg-p2 ] && extra=("${P2_KEY[@]}")
            timeout 20 wrk -t1 -c"$c" -d2s "${extra[@]}" "http://127.0.0.1:$2/" >/dev/null 2>&1 || true
        done
        for r in $(seq 1 "$ROUNDS"); do
            run_wrk direct "$c" "$r" "$DURATION" "http://127.0.0.1:$BACKEND/"
            run_wrk nginx "$c" "$r" "$DURATION" "http://127.0.0.1:$NGINX/"
            run_wrk tg "$c" "$r" "$DURATION" "http://127.0.0.1:$TG_PLAIN/"
            run_wrk tg-log "$c" "$r" "$DURATION" "http://127.0.0.1:$TG_LOG/"
            run_wrk tg-p2 "$c" "$r" "$DURATION" "http://127.0.0.1:$TG_P2/" "${P2_KEY[@]}"
            if [ -n "$BASELINE_BIN" ]; then
                run_wrk base "$c" "$r" "$DURATION" "http://127.0.0.1:$TG_BASE/"
            fi
        done
    done
    python3 - "$RESULTS" <<'EOF' | tee -a "$SUMMARY"
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for label, conns, rnd, rps, p50, p99, non2xx, sock, load in rows:
    by.setdefault((label, conns), []).append((float(rps), int(p50), int(p99), int(non2xx), int(sock), rnd))
print("   (medians over rounds; ratios are the median of the per-round ratios)")
print("   %-8s %5s %11s %9s %9s %8s %8s %7s" % ("target", "conns", "req/s", "p50 us", "p99 us", "/nginx", "/direct", "errors"))
for conns in sorted({c for _, c in by}, key=int):
    ng = {r[5]: r[0] for r in by.get(("nginx", conns), [])}
    di = {r[5]: r[0] for r in by.get(("direct", conns), [])}
    for label in ["direct", "nginx", "tg", "tg-log", "tg-p2", "base"]:
        rs = by.get((label, conns))
        if not rs:
            continue
        med = lambda i: statistics.median(r[i] for r in rs)
        vs_ng = statistics.median(r[0] / ng[r[5]] for r in rs if ng.get(r[5]))
        vs_di = statistics.median(r[0] / di[r[5]] for r in rs if di.get(r[5]))
        errs = sum(r[3] + r[4] for r in rs)
        print("   %-8s %5s %11.0f %9.0f %9.0f %8.3f %8.3f %7d" % (label, conns, med(0), med(1), med(2), vs_ng, vs_di, errs))
EOF
}

# CPU time (user + system, in clock ticks) of a process and its children (nginx's worker).
cpu_ticks() {
    local pid total=0 p
    for p in $1 $(pgrep -P "$1" || true); do
        [ -r "/proc/$p/stat" ] || continue
        # Fields 14 and 15 (utime, stime), counted after the ") " that ends the command name.
        total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

phase_p3() {
    say ""
    say "== P3: p99 at half of nginx's peak (open loop, benchtool paced, 64 connections) =="
    local peak
    peak=$(awk -F'\t' '$1 == "nginx" && $2 == 64 {print $4}' "$RESULTS" 2>/dev/null | sort -n |
        awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}')
    if [ -z "$peak" ]; then
        local r
        for r in 1 2 3; do run_wrk nginx 64 "peak$r" "$DURATION" "http://127.0.0.1:$NGINX/"; done
        peak=$(awk -F'\t' '$1 == "nginx" && $2 == 64 {print $4}' "$RESULTS" | sort -n |
            awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
    fi
    local rate
    rate=$(awk -v p="$peak" 'BEGIN {printf "%.0f", p / 2}')
    say "   nginx peak (median, 64 connections) = $peak req/s; offered rate = $rate req/s"
    say "   cpu_us/req: the proxy's CPU time (user + system, all threads) per request during the"
    say "   run, warm-up included: less sensitive to the other load on this machine than req/s"
    local r t hz
    hz=$(getconf CLK_TCK)
    for r in 1 2 3; do
        for t in "nginx $NGINX $NGINX_PROXY_PID" "tg $TG_PLAIN $PID_plain" "tg-log $TG_LOG $PID_log" \
            "tg-p2 $TG_P2 $PID_p2" ${BASELINE_BIN:+"base $TG_BASE $PID_base"}; do
            set -- $t
            local line before after extra=()
            [ "$1" = tg-p2 ] && extra=(--header "x-api-key: bench-key-0001")
            before=$(cpu_ticks "$3")
            line=$(timeout $((DURATION + 60)) "$TOOL" paced --addr "127.0.0.1:$2" --rate "$rate" \
                --connections 64 --duration "$DURATION" --warmup 2 "${extra[@]}" || echo "PACED failed")
            after=$(cpu_ticks "$3")
            local cpu
            cpu=$(awk -v t=$((after - before)) -v hz="$hz" -v r="$rate" -v d="$DURATION" \
                'BEGIN {printf "%.1f", t / hz * 1e6 / (r * (d + 2))}')
            say "   $1 round $r: $line cpu_us/req=$cpu (load $(load))"
        done
    done
}

phase_p7() {
    say ""
    say "== P7: SSE delay added per event (20 streams x 300 events, 10 ms apart) =="
    local r t
    for r in 1 2; do
        for t in "direct $SSE_BACKEND" "nginx $NGINX" "tg $TG_SSE"; do
            set -- $t
            local line
            line=$(timeout 60 "$TOOL" sse-probe --addr "127.0.0.1:$2" \
                --path "/sse?interval_ms=10&count=300" --streams 20 --events 300 ||
                echo "SSE failed")
            say "   $1 round $r: $line"
        done
    done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

phase_p8() {
    say ""
    local n=$SSE_STREAMS max=$(((NOFILE - 100) / 2))
    if [ "$n" -gt "$max" ]; then
        say "== P8: $n streams asked, but the hard descriptor limit is $NOFILE and each stream"
        say "   holds two sockets in the gateway: holding $max =="
        n=$max
    fi
    say "== P8: $n concurrent SSE streams held through one gateway (events every 1 s) =="
    start_tollgate hold "$TG_HOLD" $((TG_HOLD + 10)) warn "$WORK/sse/routes.yaml"
    timeout 30 "$TOOL" sse-probe --addr "127.0.0.1:$TG_HOLD" --path "/sse?interval_ms=1&count=20" \
        --streams 4 --events 20 >/dev/null
    local base
    base=$(rss_kib "$PID_hold")
    rm -f "$WORK/hold.ready"
    timeout 180 "$TOOL" sse-hold --addr "127.0.0.1:$TG_HOLD" --path "/sse?interval_ms=1000" \
        --streams "$n" --hold 15 --ready-file "$WORK/hold.ready" >"$WORK/hold.out" 2>&1 &
    local hold_pid=$!
    PIDS+=("$hold_pid")
    local i
    for i in $(seq 1 1800); do
        [ -f "$WORK/hold.ready" ] && break
        sleep 0.1
    done
    sleep 5
    local held hwm
    held=$(rss_kib "$PID_hold")
    hwm=$(hwm_kib "$PID_hold")
    wait "$hold_pid" || true
    say "   $(grep HOLD_OPEN "$WORK/hold.out" || echo 'HOLD_OPEN missing')"
    say "   $(grep HOLD_RESULT "$WORK/hold.out" || echo 'HOLD_RESULT missing')"
    local opened
    opened=$(sed -n 's/.*HOLD_OPEN opened=\([0-9]*\).*/\1/p' "$WORK/hold.out")
    say "   gateway RSS: before ${base} KiB, holding ${held} KiB, peak ${hwm} KiB"
    if [ "${opened:-0}" -gt 0 ]; then
        say "   per stream: $(awk -v b="$base" -v h="$held" -v p="$hwm" -v n="$opened" \
            'BEGIN {printf "%.1f KiB (RSS delta / open streams); %.1f KiB by peak RSS", (h - b) / n, (p - b) / n}')"
    fi
    sleep 2
    say "   gateway RSS after the streams closed: $(rss_kib "$PID_hold") KiB; open fds: $(ls /proc/"$PID_hold"/fd | wc -l)"
}

phase_p9() {
    say ""
    say "== P9: route churn under load (route rewritten every 10 ms for 30 s; wrk -c64 on it) =="
    local before after
    before=$(curl -s "http://127.0.0.1:$((TG_CHURN + 10))/metrics" | awk '/^tollgate_config_reloads_total/ {s += $2} END {print s + 0}')
    python3 "$ROOT/bench/config_churn.py" churn "$WORK/churn" "http://127.0.0.1:$BACKEND" 30 10 \
        >"$WORK/churn.out" 2>&1 &
    local churn_pid=$!
    PIDS+=("$churn_pid")
    run_wrk churn 64 1 30 "http://127.0.0.1:$TG_CHURN/churn/x"
    wait "$churn_pid" || true
    after=$(curl -s "http://127.0.0.1:$((TG_CHURN + 10))/metrics" | awk '/^tollgate_config_reloads_total/ {s += $2} END {print s + 0}')
    say "   $(cat "$WORK/churn.out"); reloads done by the gateway: $((after - before))"
    say "   $(awk -F'\t' '$1 == "churn" {printf "wrk: %s req/s, non-2xx %s, socket errors %s", $4, $7, $8}' "$RESULTS")"
    # The churn left a second route; restore the single route for P6.
    write_churn_config
}

phase_p6() {
    say ""
    say "== P6 (file part): change-to-traffic of a file reload, 50 changes =="
    say "   $(timeout 120 python3 "$ROOT/bench/config_churn.py" reload-latency "$WORK/churn" \
        "http://127.0.0.1:$BACKEND" "127.0.0.1:$TG_CHURN" 50)"
}

# ------------------------------------------------------------------------------------------------

: >"$SUMMARY"
: >"$RESULTS"
say "Tollgate load benchmark, $(date -u +%FT%TZ)"
say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load at start $(load)"
say "tollgate: $TG ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')); $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1)"
write_configs
start_nginx
"$TOOL" sse-backend --listen "127.0.0.1:$SSE_BACKEND" >"$WORK/sse-backend.log" 2>&1 &
PIDS+=($!)
wait_port "$SSE_BACKEND"
start_tollgate plain "$TG_PLAIN" $((TG_PLAIN + 10)) warn "$WORK/plain/routes.yaml"
start_tollgate log "$TG_LOG" $((TG_LOG + 10)) info "$WORK/plain/routes.yaml"
start_tollgate p2 "$TG_P2" $((TG_P2 + 10)) warn "$WORK/p2/routes.yaml"
start_tollgate sse "$TG_SSE" $((TG_SSE + 10)) warn "$WORK/sse/routes.yaml"
start_tollgate churn "$TG_CHURN" $((TG_CHURN + 10)) warn "$WORK/churn"
if [ -n "$BASELINE_BIN" ]; then
    say "base: $BASELINE_BIN (the same plain route, log off)"
    start_tollgate base "$TG_BASE" $((TG_BASE + 10)) warn "$WORK/plain/routes.yaml" "$BASELINE_BIN"
fi
sleep 0.5
for check in "$TG_PLAIN/" "$TG_LOG/" "$TG_CHURN/churn/" "$NGINX/"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$check")
    [ "$code" = 200 ] || { echo "http://127.0.0.1:$check answers $code" >&2; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench-key-0001' "http://127.0.0.1:$TG_P2/")
[ "$code" = 200 ] || { echo "P2 route answers $code" >&2; exit 1; }

for phase in $PHASES; do
    "phase_$phase"
done
say ""
say "load at end: $(load)"
say "summary: $SUMMARY"
