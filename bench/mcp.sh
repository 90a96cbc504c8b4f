#!/usr/bin/env bash
# P10 of shared/design/targets.md: MCP `tools/call` requests/s through an `mcp` route against the
# plain proxy rate of the same run (target >= 0.9x). One Tollgate (1 worker, access log off), one
# nginx backend answering every request; wrk -t1 POSTs the same JSON-RPC tools/call to
#   /plain      an `http` route (the plain proxy),
#   /mcp        an `mcp` route (stateless 2026-07-28 request: routed on its headers, body not read),
#   /mcp-rules  an `mcp` route with tool rules (every body read and checked, the caller's roles),
# in alternating rounds, and prints each route's median and its ratio to /plain.
# Usage: bench/mcp.sh   (TG=path/to/tollgate, DURATION=5, ROUNDS=3, CONNS=32, BASE_PORT=19400)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

TG=${TG:-target/release/tollgate}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
BASE=${BASE_PORT:-19400}
BACKEND=$BASE
TG_PORT=$((BASE + 1))
TG_ADMIN=$((BASE + 2))

[[ -x $TG ]] || { echo "no tollgate binary at $TG (cargo build --release)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx is needed (apt-get install nginx)" >&2; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if ss -ltnH "sport = :$port" | grep -q .; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $port after 10 s" >&2
    exit 1
}

mkdir -p "$WORK/nginx" "$WORK/config"
write_backend_conf "$WORK/nginx" "$BACKEND"
nginx -p "$WORK/nginx" -c "$WORK/nginx/backend.conf" -g 'daemon off;' &
PIDS+=($!)
wait_port "$BACKEND"

url="http://127.0.0.1:$BACKEND"
{
    route_yaml plain /plain "$url" "  auth:
    required: false"
    echo "---"
    route_yaml mcp /mcp "$url" "  protocol: mcp
  auth:
    required: false"
    echo "---"
    route_yaml mcp-rules /mcp-rules "$url" "  protocol: mcp
  rewrite:
    pathPrefix: /mcp
  mcp:
    tools:
      - {name: \"search_*\", roles: [user]}
      - {name: \"delete_*\", roles: [admin]}
      - {name: \"*\", roles: [user]}
  auth:
    required: true"
    cat <<EOF
---
apiVersion: v1
kind: Secret
metadata: {name: bench-key, namespace: bench}
type: Opaque
stringData: {api-key: bench-key-0001}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata: {name: bench, namespace: bench}
spec:
  clientId: bench
  secretRef: {name: bench-key, key: api-key}
  roles: [user]
EOF
} >"$WORK/config/routes.yaml"

RUST_LOG=warn "$TG" standalone --workers 1 --config "$WORK/config" \
    --listen "127.0.0.1:$TG_PORT" --admin-listen "127.0.0.1:$TG_ADMIN" >"$WORK/tollgate.log" 2>&1 &
PIDS+=($!)
wait_port "$TG_PORT"

# The request every route gets: a 2026-07-28 tools/call with its Mcp-Method/Mcp-Name headers.
cat >"$WORK/call.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"rate limits"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Mcp-Protocol-Version"] = "2026-07-28"
wrk.headers["Mcp-Method"] = "tools/call"
wrk.headers["Mcp-Name"] = "search_docs"
wrk.headers["X-Api-Key"] = "bench-key-0001"
EOF

# Every route must answer 200 before it is measured.
for path in /plain /mcp /mcp-rules; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$TG_PORT$path" \
        -H 'content-type: application/json' -H 'x-api-key: bench-key-0001' \
        -H 'mcp-method: tools/call' -H 'mcp-name: search_docs' \
        -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs","arguments":{}}}')
    [[ $code == 200 ]] || { echo "$path answers $code" >&2; cat "$WORK/tollgate.log" >&2; exit 1; }
done

echo "MCP tools/call load (P10), $(date -u +%FT%TZ): wrk -t1 -c$CONNS, ${DURATION}s x $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A rates
for round in $(seq 1 "$ROUNDS"); do
    for path in /plain /mcp /mcp-rules; do
        out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/call.lua" "http://127.0.0.1:$TG_PORT$path")
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
        printf '  round %s %-10s %10s req/s  non2xx %s\n' "$round" "$path" "$rps" "${non2xx:-0}"
        rates[$path]+="$rps "
    done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=$(median "${rates[/plain]}")
for path in /plain /mcp /mcp-rules; do
    m=$(median "${rates[$path]}")
    printf '%-10s median %10s req/s  %.3fx of /plain\n' "$path" "$m" "$(awk -v a="$m" -v b="$plain" 'BEGIN {print a / b}')"
done
