# Shared by bench/run.sh, bench/profile.sh and bench/syscalls.sh (sourced, not run): the nginx
# backend and proxy configurations and the Tollgate routes they all measure, written once so the
# three scripts measure the same setup.

# write_backend_conf DIR PORT: nginx answering a 23-byte body on 127.0.0.1:PORT (1 worker,
# unlimited keep-alive requests). Writes DIR/backend.conf; pid and log go to DIR.
write_backend_conf() {
    local dir=$1 port=$2
    cat >"$dir/backend.conf" <<EOF
worker_processes 1;
pid $dir/backend.pid;
error_log $dir/backend-error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / { return 200 "hello from the backend\n"; }
    }
}
EOF
}

# write_proxy_conf DIR LISTEN_PORT BACKEND_PORT [SSE_BACKEND_PORT] [top-level directives]: nginx as
# the reverse proxy the targets compare against (1 worker, 256 idle upstream connections, access
# log off). With an SSE backend port, /sse goes there unbuffered. Writes DIR/proxy.conf.
write_proxy_conf() {
    local dir=$1 listen=$2 backend=$3 sse=${4:-} top=${5:-}
    local sse_upstream="" sse_location=""
    if [ -n "$sse" ]; then
        sse_upstream="upstream sse { server 127.0.0.1:$sse; keepalive 256; }"
        sse_location="location /sse { proxy_pass http://sse; proxy_buffering off; }"
    fi
    cat >"$dir/proxy.conf" <<EOF
$top
worker_processes 1;
pid $dir/proxy.pid;
error_log $dir/proxy-error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 100000000;
    upstream backend {
        server 127.0.0.1:$backend;
        keepalive 256;
        keepalive_requests 100000000;
    }
    $sse_upstream
    server {
        listen 127.0.0.1:$listen backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / { proxy_pass http://backend; }
        $sse_location
    }
}
EOF
}

# route_yaml NAME PREFIX BACKEND_URL [extra spec lines]: one AgentRoute in namespace bench.
route_yaml() {
    cat <<EOF
apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata:
  name: $1
  namespace: bench
spec:
  match:
    pathPrefix: $2
  backends:
    - url: $3
${4:-}
EOF
}

# plain_routes_yaml BACKEND_URL: the plain route (no key).
plain_routes_yaml() {
    route_yaml plain / "$1" "  auth:
    required: false"
}

# p2_routes_yaml BACKEND_URL: P2's route and key: a key is required, the key and the route both
# limit (never hit), least connections. Requests send `x-api-key: bench-key-0001`.
p2_routes_yaml() {
    route_yaml p2 / "$1" "  auth:
    required: true
  loadBalancer: leastConnections
  rateLimit:
    requestsPerMinute: 1000000000
    burst: 1000000000"
    cat <<EOF
---
apiVersion: v1
kind: Secret
metadata:
  name: bench-key
  namespace: bench
stringData:
  api-key: bench-key-0001
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentApiKey
metadata:
  name: bench
  namespace: bench
spec:
  clientId: bench-client
  secretRef: {name: bench-key, key: api-key}
  roles: [user]
  rateLimit: {requestsPerMinute: 1000000000, burst: 1000000000}
EOF
}
