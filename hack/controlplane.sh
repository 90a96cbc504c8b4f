#!/usr/bin/env bash
# A real, minimal Kubernetes control plane for Tollgate's integration tests:
# etcd + kube-apiserver (v1.36.3, built by hack/build-k8s-tools.sh), started
# envtest-style on 127.0.0.1 with free ports, RBAC and client-cert auth.
# No controller-manager, scheduler or kubelet run: objects are stored and
# validated, nothing reconciles them (see hack/README.md).
#
#   hack/controlplane.sh start DIR   start; print KUBECONFIG=... and DIR/env
#   hack/controlplane.sh stop DIR    stop the processes whose PIDs are in DIR
#   hack/controlplane.sh status DIR  exit 0 (and print DIR/env) if running
#
# DIR gets: pki/ (CA, serving, client and service-account keys), etcd/ (data),
# admin.kubeconfig (CN=admin, O=system:masters), user.kubeconfig
# (CN=tollgate-test, O=tollgate-testers: no rights unless an RBAC binding
# grants them), *.log, *.pid and env (KEY=VALUE lines, see README).
#
# Environment:
#   INSTALL_CRDS_DIR   if set: `kubectl apply --server-side -R -f` it after
#                      start and wait until its CRDs are Established.
#   READY_TIMEOUT      seconds to wait for /readyz (default 60).
#   TOLLGATE_K8S_BIN   use the binaries in this dir instead of running build-k8s-tools.sh.
#   TOLLGATE_TOOLS_CACHE  passed on to hack/build-k8s-tools.sh.
set -euo pipefail

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_TIMEOUT=${READY_TIMEOUT:-60}
USER_NAME=tollgate-test
USER_GROUP=tollgate-testers
SERVICE_CIDR=10.96.0.0/12
SERVICE_IP=10.96.0.1 # first IP of SERVICE_CIDR: the `kubernetes` Service

log() { echo "controlplane: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  echo "usage: $0 start|stop|status DIR" >&2
  exit 2
}

# ---------------------------------------------------------------- helpers --

abs_dir() { # create and absolutize DIR
  mkdir -p "$1"
  (cd "$1" && pwd)
}

# pid_alive PIDFILE NAME: true if the pid in PIDFILE runs a binary named NAME
# (guards against killing an unrelated process that reused the pid).
pid_alive() {
  local pid
  [[ -r $1 ]] || return 1
  read -r pid <"$1" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -r /proc/$pid/cmdline ]] || return 0
  local argv0
  argv0=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)
  [[ ${argv0##*/} == "$2" ]]
}

# free_ports N: print N distinct free TCP ports on 127.0.0.1.
free_ports() {
  local n=$1
  if command -v python3 >/dev/null 2>&1 && python3 - "$n" <<'EOF' 2>/dev/null; then
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
    return 0
  fi
  # Fallback without python: random ports nobody answers on.
  local out=() p tries=0
  while ((${#out[@]} < n && tries < 200)); do
    tries=$((tries + 1))
    p=$((20000 + RANDOM % 30000))
    [[ " ${out[*]} " == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      out+=("$p")
    fi
  done
  ((${#out[@]} == n)) || return 1
  echo "${out[*]}"
}

# ------------------------------------------------------------------- PKI --

OPENSSL_REQ_CNF='[req]
distinguished_name = dn
prompt = no
[dn]
'

gen_key() { openssl genrsa -out "$1" 2048 2>/dev/null; chmod 600 "$1"; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# sign_cert PKI NAME SUBJECT EXT: NAME.key/NAME.crt signed by PKI/ca.
sign_cert() {
  local pki=$1 name=$2 subj=$3 ext=$4
  gen_key "$pki/$name.key"
  openssl req -new -key "$pki/$name.key" -subj "$subj" \
    -config <(printf '%s' "$OPENSSL_REQ_CNF") -out "$pki/$name.csr"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "$(serial)" -days 3650 -sha256 \
    -extfile <(printf '%s\n' "$ext") -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr"
}

gen_pki() {
  local pki=$1
  if [[ -s $pki/ca.crt && -s $pki/server.crt && -s $pki/admin.crt && -s $pki/user.crt && -s $pki/sa.pub ]]; then
    return 0 # reuse across restarts of the same DIR
  fi
  log "generating PKI in $pki"
  rm -rf "$pki"
  mkdir -p "$pki"
  chmod 700 "$pki"
  # CA: signs the serving cert and the client certs (--client-ca-file).
  gen_key "$pki/ca.key"
  openssl req -new -key "$pki/ca.key" -subj "/CN=tollgate-test-ca" \
    -config <(printf '%s' "$OPENSSL_REQ_CNF") -out "$pki/ca.csr"
  openssl x509 -req -in "$pki/ca.csr" -signkey "$pki/ca.key" \
    -set_serial "$(serial)" -days 3650 -sha256 -out "$pki/ca.crt" \
    -extfile <(printf '%s\n' \
      'basicConstraints=critical,CA:TRUE' \
      'keyUsage=critical,keyCertSign,cRLSign,digitalSignature' \
      'subjectKeyIdentifier=hash') 2>/dev/null
  rm -f "$pki/ca.csr"
  local common='subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment'
  sign_cert "$pki" server "/CN=kube-apiserver" "$common
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign_cert "$pki" admin "/O=system:masters/CN=admin" "$common
extendedKeyUsage=clientAuth"
  sign_cert "$pki" user "/O=$USER_GROUP/CN=$USER_NAME" "$common
extendedKeyUsage=clientAuth"
  # Service-account token signing key pair.
  gen_key "$pki/sa.key"
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

b64() { base64 -w0 <"$1"; }

# write_kubeconfig FILE URL CA CERT KEY USER
write_kubeconfig() {
  local file=$1 url=$2 ca=$3 crt=$4 key=$5 user=$6
  (umask 077 && cat >"$file.tmp") <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tollgate-test
  cluster:
    server: $url
    certificate-authority-data: $(b64 "$ca")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$crt")
    client-key-data: $(b64 "$key")
contexts:
- name: $user@tollgate-test
  context:
    cluster: tollgate-test
    user: $user
    namespace: default
current-context: $user@tollgate-test
EOF
  mv -f "$file.tmp" "$file"
}

# -------------------------------------------------------------- processes --

# kill_pidfiles PIDFILE NAME [PIDFILE NAME...]: TERM them all at once (the
# data is throw-away, so no ordered shutdown), KILL what is left after 15 s.
kill_pidfiles() {
  local pids=() pid i left
  while (($# >= 2)); do
    if pid_alive "$1" "$2"; then
      read -r pid <"$1"
      pids+=("$pid")
      kill -TERM "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
    shift 2
  done
  for ((i = 0; i < 150; i++)); do
    left=
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && left=1
    done
    [[ -z $left ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not exit on TERM; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

# spawn PIDFILE LOG CMD...: start CMD detached (own session, no tty, output
# to LOG) so that it outlives this script and never holds the caller's pipes.
# The pid is written by the process itself right before it execs CMD, so it
# is right even if setsid has to fork.
spawn() {
  local pidfile=$1 logf=$2 i
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
    </dev/null >>"$logf" 2>&1 &
  for ((i = 0; i < 250; i++)); do
    [[ -s $pidfile ]] && return 0
    sleep 0.02
  done
  die "could not start $1"
}

# proc_running PIDFILE: the process is alive (no name check: right after
# spawn it may not have exec'ed its binary yet).
proc_running() {
  local pid
  [[ -r $1 ]] && read -r pid <"$1" && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

dump_logs() {
  local f
  for f in "$@"; do
    [[ -r $f ]] || continue
    log "---- last lines of $f ----"
    tail -n 25 "$f" >&2 || true
  done
}

# ---------------------------------------------------------------- start --

cmd_start() {
  local dir bin kubectl
  dir=$(abs_dir "$1")
  [[ $dir =~ [[:space:]] ]] && die "DIR must not contain whitespace: $dir"
  if pid_alive "$dir/kube-apiserver.pid" kube-apiserver || pid_alive "$dir/etcd.pid" etcd; then
    die "a control plane already runs in $dir (run: $0 stop $dir)"
  fi
  command -v openssl >/dev/null || die "openssl is required"
  command -v curl >/dev/null || die "curl is required"

  local t0=$SECONDS
  # TOLLGATE_K8S_BIN (CI exports the dir build-k8s-tools.sh printed) skips the build step.
  bin=${TOLLGATE_K8S_BIN:-$("$HACK_DIR/build-k8s-tools.sh" | tail -n 1)}
  [[ -x $bin/kube-apiserver && -x $bin/etcd && -x $bin/kubectl ]] || die "tools missing in '$bin'"
  kubectl=$bin/kubectl

  local pki=$dir/pki
  gen_pki "$pki"
  rm -f "$dir/env"

  local attempt ports etcd_port peer_port api_port url ok=
  local start_ns
  start_ns=$(date +%s%N)
  for attempt in 1 2 3; do
    ports=$(free_ports 3) || die "could not find free ports"
    read -r etcd_port peer_port api_port <<<"$ports"
    url=https://127.0.0.1:$api_port
    : >"$dir/etcd.log"
    : >"$dir/kube-apiserver.log"

    log "starting etcd on 127.0.0.1:$etcd_port (attempt $attempt)"
    spawn "$dir/etcd.pid" "$dir/etcd.log" "$bin/etcd" \
      --name=default \
      --data-dir="$dir/etcd" \
      --listen-client-urls="http://127.0.0.1:$etcd_port" \
      --advertise-client-urls="http://127.0.0.1:$etcd_port" \
      --listen-peer-urls="http://127.0.0.1:$peer_port" \
      --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
      --initial-cluster="default=http://127.0.0.1:$peer_port" \
      --unsafe-no-fsync=true \
      --log-level=warn

    log "starting kube-apiserver on $url"
    spawn "$dir/kube-apiserver.pid" "$dir/kube-apiserver.log" "$bin/kube-apiserver" \
      --bind-address=127.0.0.1 \
      --advertise-address=127.0.0.1 \
      --secure-port="$api_port" \
      --etcd-servers="http://127.0.0.1:$etcd_port" \
      --tls-cert-file="$pki/server.crt" \
      --tls-private-key-file="$pki/server.key" \
      --client-ca-file="$pki/ca.crt" \
      --authorization-mode=RBAC \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-account-key-file="$pki/sa.pub" \
      --service-account-signing-key-file="$pki/sa.key" \
      --service-cluster-ip-range="$SERVICE_CIDR" \
      --allow-privileged=true \
      --disable-admission-plugins=ServiceAccount \
      --endpoint-reconciler-type=none \
      --enable-priority-and-fairness=false \
      --profiling=false \
      --v=0

    # Wait for /readyz (includes etcd, RBAC bootstrap roles, CRD informers).
    local deadline=$((SECONDS + READY_TIMEOUT)) body
    while ((SECONDS < deadline)); do
      if ! proc_running "$dir/etcd.pid" || ! proc_running "$dir/kube-apiserver.pid"; then
        break
      fi
      body=$(curl -fsS --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
        "$url/readyz" 2>/dev/null || true)
      if [[ $body == ok ]]; then
        ok=1
        break
      fi
      sleep 0.1
    done
    [[ -n $ok ]] && break

    if grep -qiE 'address already in use' "$dir/etcd.log" "$dir/kube-apiserver.log" 2>/dev/null && ((attempt < 3)); then
      log "port clash; retrying with other ports"
      kill_pidfiles "$dir/kube-apiserver.pid" kube-apiserver "$dir/etcd.pid" etcd
      continue
    fi
    dump_logs "$dir/etcd.log" "$dir/kube-apiserver.log"
    kill_pidfiles "$dir/kube-apiserver.pid" kube-apiserver "$dir/etcd.pid" etcd
    die "kube-apiserver did not become ready within ${READY_TIMEOUT}s (logs in $dir)"
  done
  [[ -n $ok ]] || die "could not start the control plane (logs in $dir)"

  write_kubeconfig "$dir/admin.kubeconfig" "$url" "$pki/ca.crt" "$pki/admin.crt" "$pki/admin.key" admin
  write_kubeconfig "$dir/user.kubeconfig" "$url" "$pki/ca.crt" "$pki/user.crt" "$pki/user.key" "$USER_NAME"

  # /readyz does not cover the system namespaces; tests often use `default`.
  local deadline=$((SECONDS + 20))
  until curl -fsS -o /dev/null --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" \
    --key "$pki/admin.key" "$url/api/v1/namespaces/default" 2>/dev/null; do
    ((SECONDS < deadline)) || die "namespace 'default' was not created (logs in $dir)"
    sleep 0.1
  done
  local ready_ms=$((($(date +%s%N) - start_ns) / 1000000))
  log "kube-apiserver ready in ${ready_ms} ms"

  if [[ -n ${INSTALL_CRDS_DIR:-} ]]; then
    install_crds "$kubectl" "$dir/admin.kubeconfig" "$INSTALL_CRDS_DIR"
  fi

  {
    echo "APISERVER_URL=$url"
    echo "ADMIN_KUBECONFIG=$dir/admin.kubeconfig"
    echo "USER_KUBECONFIG=$dir/user.kubeconfig"
    echo "KUBECTL=$kubectl"
    echo "HELM=$bin/helm"
    echo "TOOLS_BIN=$bin"
    echo "ETCD_URL=http://127.0.0.1:$etcd_port"
    echo "CA_CERT=$pki/ca.crt"
    echo "USER_NAME=$USER_NAME"
    echo "USER_GROUP=$USER_GROUP"
    echo "KUBE_VERSION=$("$bin/kube-apiserver" --version | awk '{print $2}')"
  } >"$dir/env.tmp"
  mv -f "$dir/env.tmp" "$dir/env"
  log "control plane up in $((SECONDS - t0))s; stop with: $0 stop $dir"
  echo "KUBECONFIG=$dir/admin.kubeconfig"
  cat "$dir/env"
}

install_crds() {
  local kubectl=$1 kc=$2 crds=$3 names
  [[ -e $crds ]] || die "INSTALL_CRDS_DIR=$crds does not exist"
  if [[ -d $crds ]] && ! find "$crds" -type f \( -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) | grep -q .; then
    log "INSTALL_CRDS_DIR=$crds has no manifests; nothing to install"
    return 0
  fi
  log "applying $crds"
  # Server-side apply: large CRDs overflow the client-side last-applied annotation.
  names=$("$kubectl" --kubeconfig "$kc" apply --server-side --force-conflicts -R -f "$crds" -o name) ||
    die "kubectl apply -f $crds failed"
  names=$(grep '^customresourcedefinition' <<<"$names" || true)
  if [[ -n $names ]]; then
    # shellcheck disable=SC2086
    "$kubectl" --kubeconfig "$kc" wait --for=condition=Established --timeout=60s $names >&2 ||
      die "CRDs from $crds did not become Established"
  fi
}

# ----------------------------------------------------------------- stop --

cmd_stop() {
  local dir=$1
  [[ -d $dir ]] || { log "$dir does not exist; nothing to stop"; return 0; }
  dir=$(cd "$dir" && pwd)
  kill_pidfiles "$dir/kube-apiserver.pid" kube-apiserver "$dir/etcd.pid" etcd
  log "stopped control plane in $dir"
}

cmd_status() {
  local dir=$1
  if [[ -d $dir ]] && pid_alive "$dir/kube-apiserver.pid" kube-apiserver && pid_alive "$dir/etcd.pid" etcd; then
    cat "$dir/env" 2>/dev/null || true
    return 0
  fi
  log "not running in $dir"
  return 1
}

[[ $# -eq 2 ]] || usage
case $1 in
start) cmd_start "$2" ;;
stop) cmd_stop "$2" ;;
status) cmd_status "$2" ;;
*) usage ;;
esac
