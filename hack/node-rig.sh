#!/usr/bin/env bash
# A real single-node Kubernetes cluster for the node tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy and containerd, all child
# processes of this script's caller, all addresses private to this machine, no registry.
#
#   hack/node-rig.sh build        # build/cache the binaries, install the Debian packages
#   hack/node-rig.sh check        # exit 0 if this host can run a node, else say why (exit 3)
#   hack/node-rig.sh up DIR       # start a node (state under DIR); prints DIR/env
#   hack/node-rig.sh down DIR     # stop it and remove every trace (idempotent)
#   hack/node-rig.sh status DIR
#   hack/node-rig.sh leftovers DIR  # list what is left after `down` (exit 1 if anything)
#
# Facts this is built on: ../shared/design/node-rig.md (and docs/node-rig.md for users).
set -euo pipefail

KUBE_VERSION=v1.36.3
CNI_VERSION=v1.9.1
RECIPE_REV=1
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}
NODE_BIN=${CACHE_ROOT}/k8s-node-${KUBE_VERSION}/bin
CNI_BIN=${CACHE_ROOT}/cni-plugins-${CNI_VERSION}/bin
NODE_TOOLS=(kube-controller-manager kube-scheduler kubelet kube-proxy)
CNI_TOOLS=(bridge host-local loopback portmap)
APT_PKGS=(containerd runc iptables conntrack)

log() { echo "node-rig: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
stamp_of() { # module dir -> stamp keyed by versions, recipe and go.mod
  echo "kubernetes=${KUBE_VERSION} cni=${CNI_VERSION} recipe=${RECIPE_REV} gomod=$(cksum <"$1/go.mod" | cut -d' ' -f1)"
}
have_all() { # dir stamp tools...
  local dir=$1 stamp=$2 t s=
  shift 2
  for t in "$@"; do [[ -x ${dir}/${t} ]] || return 1; done
  [[ -r ${dir}/../VERSIONS ]] && read -r s <"${dir}/../VERSIONS"
  [[ ${s} == "${stamp}" ]]
}

go_env() {
  if ! command -v go >/dev/null 2>&1; then
    for d in /usr/local/go/bin /usr/lib/go/bin; do
      [[ -x ${d}/go ]] && PATH=${d}:${PATH} && break
    done
  fi
  command -v go >/dev/null 2>&1 || die "no 'go' on PATH (need Go >= 1.26)"
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
}

# go_build MODDIR OUTDIR STAMP LDFLAGS TAGS PKG...: one `go build` (shared packages compile once)
# into a temporary dir, then moved into place; serialized by flock.
go_build() {
  local mod=$1 out=$2 stamp=$3 ldflags=$4 tags=$5 tmp start
  shift 5
  mkdir -p "${out}"
  exec 8>"${out}/../.lock"
  flock 8
  tmp=$(mktemp -d "${out}/../.build.XXXXXX")
  start=$(date +%s)
  log "go build $* (slow on a cold Go cache: ~5 min and ~1.9 GB for the kubelet set)"
  (cd "${mod}" && nice -n 10 go build -trimpath -tags "${tags}" -ldflags "${ldflags}" -o "${tmp}/" "$@")
  local b
  for b in "${tmp}"/*; do mv -f "${b}" "${out}/"; done
  rmdir "${tmp}"
  echo "${stamp}" >"${out}/../VERSIONS"
  log "built in $(($(date +%s) - start))s into ${out}"
  exec 8>&-
}

build_node_tools() {
  local stamp
  stamp=$(stamp_of "${HACK_DIR}/k8s-tools")
  have_all "${NODE_BIN}" "${stamp}" "${NODE_TOOLS[@]}" && return 0
  go_env
  # Version ldflags as hack/build-k8s-tools.sh sets them, so the node reports v1.36.3.
  local ver=${KUBE_VERSION#v} ldflags="-s -w" pkg build_date
  build_date=$(cd "${HACK_DIR}/k8s-tools" && go list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes 2>/dev/null || true)
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X ${pkg}.gitVersion=${KUBE_VERSION} -X ${pkg}.gitMajor=${ver%%.*}"
    ldflags+=" -X ${pkg}.gitMinor=$(echo "${ver}" | cut -d. -f2) -X ${pkg}.gitTreeState=clean"
    ldflags+=" -X ${pkg}.buildDate=${build_date:-1970-01-01T00:00:00Z} -X ${pkg}.gitCommit="
  done
  go_build "${HACK_DIR}/k8s-tools" "${NODE_BIN}" "${stamp}" "${ldflags}" notest,grpcnotrace \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
}

build_cni() {
  local stamp
  stamp=$(stamp_of "${HACK_DIR}/cni-tools")
  have_all "${CNI_BIN}" "${stamp}" "${CNI_TOOLS[@]}" && return 0
  go_env
  local p=github.com/containernetworking/plugins
  go_build "${HACK_DIR}/cni-tools" "${CNI_BIN}" "${stamp}" \
    "-s -w -X ${p}/pkg/utils/buildversion.BuildVersion=${CNI_VERSION}" "" \
    ${p}/plugins/main/bridge ${p}/plugins/ipam/host-local ${p}/plugins/main/loopback \
    ${p}/plugins/meta/portmap
}

install_packages() {
  local missing=() p
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f '${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed' || missing+=("${p}")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get"
  log "apt-get install ${missing[*]}"
  # The packages' own services are not wanted: the rig runs containerd itself.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
  rm -f /usr/sbin/policy-rc.d
  # If a service manager started containerd anyway, it is not ours to keep.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
    systemctl disable --now containerd >&2 || true
  fi
}

cmd_build() {
  install_packages
  build_cni
  build_node_tools
  "${HACK_DIR}/build-k8s-tools.sh" >/dev/null
  echo "NODE_BIN=${NODE_BIN}"
  echo "CNI_BIN=${CNI_BIN}"
}


# ---------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------
# Every address is private to this machine: a bridge that exists only here, its first address
# for the apiserver (the `kubernetes` Service needs one that is not loopback), pods on the rest.
BRIDGE=tgrig0
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
API_PORT=6443
NODE_NAME=tollgate-node
CNI_NET=tollgate-rig
FW_CHAIN=TOLLGATE-RIG
PAUSE_IMAGE=registry.k8s.io/pause:3.10
# One rig per machine (the kubelet's iptables chains, cgroups and the bridge are global).
CURRENT=/run/tollgate-node-rig
# Kernel settings the rig or its components change; saved at `up`, restored at `down`.
SYSCTLS=(net/ipv4/ip_forward net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables
  net/bridge/bridge-nf-call-ip6tables vm/overcommit_memory vm/panic_on_oom kernel/panic
  kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes
  net/netfilter/nf_conntrack_max net/netfilter/nf_conntrack_tcp_timeout_established
  net/netfilter/nf_conntrack_tcp_timeout_close_wait)
COMPONENTS=(etcd kube-apiserver containerd kube-controller-manager kube-scheduler kubelet kube-proxy)
READY_TIMEOUT=${READY_TIMEOUT:-90}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# check: can this host run a node? Prints the reason and exits 3 when it cannot.
cmd_check() {
  local why=()
  [[ $(id -u) == 0 ]] || why+=("not root")
  [[ $(uname -s) == Linux ]] || why+=("not Linux")
  if ((${#why[@]} == 0)); then
    ip netns add tgrig-probe 2>/dev/null && ip netns del tgrig-probe 2>/dev/null || why+=("cannot create a network namespace")
    ip link add tgrig-probe type bridge 2>/dev/null && ip link del tgrig-probe 2>/dev/null || why+=("cannot create a bridge")
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || why+=("no overlay filesystem")
    [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] || why+=("no memory cgroup")
    if command -v iptables >/dev/null 2>&1; then
      iptables -w -t nat -L -n >/dev/null 2>&1 || why+=("iptables does not work here")
    fi
  fi
  if ((${#why[@]})); then
    echo "node-rig: this host cannot run a node: $(IFS=';'; echo "${why[*]}")"
    exit 3
  fi
  echo "node-rig: this host can run a node"
}

gen_key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; chmod 600 "$1"; }
# cert PKI NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by PKI/ca.
cert() {
  local pki=$1 name=$2 subj=$3 ext=$4
  gen_key "${pki}/${name}.key"
  openssl req -new -key "${pki}/${name}.key" -subj "${subj}" -out "${pki}/${name}.csr" 2>/dev/null
  openssl x509 -req -in "${pki}/${name}.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
    -extfile <(printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "${ext}") \
    -out "${pki}/${name}.crt" 2>/dev/null
  rm -f "${pki}/${name}.csr"
}
gen_pki() {
  local pki=$1
  [[ -s ${pki}/done ]] && return 0
  rm -rf "${pki}" && mkdir -p "${pki}" && chmod 700 "${pki}"
  gen_key "${pki}/ca.key"
  openssl req -x509 -new -key "${pki}/ca.key" -subj "/CN=tollgate-node-rig-ca" -days 3650 -sha256 \
    -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign,digitalSignature' \
    -out "${pki}/ca.crt" 2>/dev/null
  cert "${pki}" apiserver /CN=kube-apiserver "extendedKeyUsage=serverAuth
subjectAltName=IP:${NODE_IP},IP:${SERVICE_IP},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  local c='extendedKeyUsage=clientAuth'
  cert "${pki}" admin "/O=system:masters/CN=admin" "${c}"
  cert "${pki}" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "${c}"
  cert "${pki}" kube-controller-manager /CN=system:kube-controller-manager "${c}"
  cert "${pki}" kube-scheduler /CN=system:kube-scheduler "${c}"
  cert "${pki}" kubelet "/O=system:nodes/CN=system:node:${NODE_NAME}" "${c}"
  cert "${pki}" kube-proxy /CN=system:kube-proxy "${c}"
  gen_key "${pki}/sa.key"
  openssl ec -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub" 2>/dev/null
  echo ok >"${pki}/done"
}
kubeconfig() { # DIR NAME: DIR/NAME.kubeconfig for the client cert NAME
  local dir=$1 name=$2 pki=$1/pki
  (umask 077 && cat >"${dir}/${name}.kubeconfig") <<KC
apiVersion: v1
kind: Config
clusters:
- name: node-rig
  cluster:
    server: https://${NODE_IP}:${API_PORT}
    certificate-authority-data: $(base64 -w0 <"${pki}/ca.crt")
users:
- name: ${name}
  user:
    client-certificate-data: $(base64 -w0 <"${pki}/${name}.crt")
    client-key-data: $(base64 -w0 <"${pki}/${name}.key")
contexts:
- name: ${name}@node-rig
  context: {cluster: node-rig, user: ${name}, namespace: default}
current-context: ${name}@node-rig
KC
}

free_ports() {
  python3 -c 'import socket
ss=[socket.socket() for _ in range(2)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])'
}

# spawn DIR NAME CMD...: start CMD in its own session with no inherited descriptors beyond
# 0-2 (a lock fd held by a daemon would block the next build or `up`); pid in DIR/run/NAME.pid.
spawn() {
  local dir=$1 name=$2 i
  shift 2
  rm -f "${dir}/run/${name}.pid"
  # shellcheck disable=SC2016
  setsid bash -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec ${fd}>&-"; done 2>/dev/null
    echo $$ >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "$@"' "${dir}/run/${name}.pid" "$@" \
    </dev/null >>"${dir}/log/${name}.log" 2>&1 &
  for ((i = 0; i < 250; i++)); do
    [[ -s ${dir}/run/${name}.pid ]] && return 0
    sleep 0.02
  done
  die "could not start ${name}"
}
alive() { # DIR NAME
  local pid
  [[ -r $1/run/$2.pid ]] && read -r pid <"$1/run/$2.pid" && [[ ${pid} =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null
}
wait_for() { # SECONDS WHAT CMD...: poll CMD every 0.2 s
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
  log "${what} after $((SECONDS - T0))s"
}

write_configs() {
  local dir=$1
  mkdir -p "${dir}/containerd/certs.d" "${dir}/cni/net.d" "${dir}/kubelet"
  # No registry: every name resolves to a dead local address. containerd 1.6 needs the host
  # table (with `server` alone it silently falls back to the real registry).
  local reg
  for reg in _default docker.io registry.k8s.io k8s.gcr.io gcr.io ghcr.io quay.io mcr.microsoft.com public.ecr.aws; do
    mkdir -p "${dir}/containerd/certs.d/${reg}"
    cat >"${dir}/containerd/certs.d/${reg}/hosts.toml" <<'TOML'
server = "http://127.0.0.1:1"
[host."http://127.0.0.1:1"]
  capabilities = ["pull", "resolve"]
TOML
  done
  cat >"${dir}/containerd/config.toml" <<TOML
version = 2
root = "${dir}/containerd/root"
state = "${dir}/containerd/state"
# Nobody here may set a negative oom_score_adj (no CAP_SYS_RESOURCE in the bounding set).
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "${dir}/containerd/containerd.sock"
[ttrpc]
  address = "${dir}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN}"
    conf_dir = "${dir}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "${dir}/containerd/certs.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "${dir}/containerd/opt"
TOML
  cat >"${dir}/cni/net.d/10-${CNI_NET}.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "${CNI_NET}",
  "plugins": [
    {
      "type": "bridge", "bridge": "${BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "${dir}/cni/ipam",
        "ranges": [[{"subnet": "${POD_CIDR}", "rangeStart": "10.88.1.1", "rangeEnd": "10.88.255.254", "gateway": "${NODE_IP}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  cat >"${dir}/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid); the kubelet refuses it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
address: ${NODE_IP}
port: 10250
readOnlyPort: 0
healthzPort: 0
containerRuntimeEndpoint: unix://${dir}/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${dir}/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
failSwapOn: false
# A test machine's disk is often fuller than a node's defaults allow.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
YAML
  cat >"${dir}/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: ${dir}/kube-proxy.kubeconfig}
hostnameOverride: ${NODE_NAME}
mode: iptables
clusterCIDR: ${POD_CIDR}
oomScoreAdj: 0
healthzBindAddress: ${NODE_IP}:10256
metricsBindAddress: ${NODE_IP}:10249
nodePortAddresses: ["${NODE_IP}/32"]
iptables: {localhostNodePorts: false, masqueradeAll: false}
# Leave the host's conntrack settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

save_sysctls() {
  local dir=$1 k v
  [[ -s ${dir}/sysctl.orig ]] && return 0
  : >"${dir}/sysctl.orig.tmp"
  for k in "${SYSCTLS[@]}"; do
    [[ -r /proc/sys/${k} ]] && read -r v <"/proc/sys/${k}" && echo "${k}=${v}" >>"${dir}/sysctl.orig.tmp"
  done
  mv -f "${dir}/sysctl.orig.tmp" "${dir}/sysctl.orig"
  cp -f "${dir}/sysctl.orig" "${dir}/sysctl.before"
}
restore_sysctls() {
  local dir=$1 k v
  [[ -r ${dir}/sysctl.orig ]] || return 0
  while IFS== read -r k v; do
    [[ -w /proc/sys/${k} ]] && echo "${v}" >"/proc/sys/${k}" 2>/dev/null || true
  done <"${dir}/sysctl.orig"
  rm -f "${dir}/sysctl.orig"
}

firewall_up() {
  iptables -w -N "${FW_CHAIN}" 2>/dev/null || iptables -w -F "${FW_CHAIN}"
  # Pods may talk to each other and to this machine, never beyond it (no masquerade either).
  iptables -w -A "${FW_CHAIN}" -i "${BRIDGE}" ! -o "${BRIDGE}" -j DROP
  iptables -w -A "${FW_CHAIN}" -o "${BRIDGE}" ! -i "${BRIDGE}" -j DROP
  iptables -w -C FORWARD -j "${FW_CHAIN}" 2>/dev/null || iptables -w -I FORWARD 1 -j "${FW_CHAIN}"
}

cmd_up() {
  local dir
  dir=$(abs_dir "$1")
  [[ ${dir} =~ [[:space:]] ]] && die "DIR must not contain whitespace"
  T0=$SECONDS
  if [[ -r ${CURRENT} ]]; then
    local other
    read -r other <"${CURRENT}"
    if [[ ${other} != "${dir}" ]] && alive "${other}" kube-apiserver; then
      die "a node rig already runs in ${other} (one per machine): $0 down ${other}"
    fi
    if [[ ${other} == "${dir}" ]] && node_healthy "${dir}"; then
      log "already up in ${dir}"
      cat "${dir}/env"
      return 0
    fi
    log "cleaning up what an earlier rig in ${other} left"
    cmd_down "${other}"
  fi
  cmd_check >/dev/null || die "$(cmd_check)"
  command -v openssl >/dev/null || die "openssl is required"
  cmd_build >/dev/null
  local k8s_bin
  k8s_bin=${TOLLGATE_K8S_BIN:-$("${HACK_DIR}/build-k8s-tools.sh" | tail -n 1)}
  mkdir -p "${dir}/run" "${dir}/log"
  echo "${dir}" >"${CURRENT}"
  rm -f "${dir}/env"
  gen_pki "${dir}/pki"
  local n
  for n in admin kube-controller-manager kube-scheduler kubelet kube-proxy; do kubeconfig "${dir}" "${n}"; done
  write_configs "${dir}"
  save_sysctls "${dir}"

  # The bridge first: the apiserver binds its address; the CNI bridge plugin adopts it.
  ip link show "${BRIDGE}" >/dev/null 2>&1 || ip link add "${BRIDGE}" type bridge
  ip addr replace "${NODE_IP}/16" dev "${BRIDGE}"
  ip link set "${BRIDGE}" up
  echo 1 >/proc/sys/net/ipv4/ip_forward
  firewall_up

  local ports etcd_port peer_port
  read -r etcd_port peer_port <<<"$(free_ports)"
  spawn "${dir}" etcd "${k8s_bin}/etcd" --name=node-rig --data-dir="${dir}/etcd" \
    --listen-client-urls="http://127.0.0.1:${etcd_port}" --advertise-client-urls="http://127.0.0.1:${etcd_port}" \
    --listen-peer-urls="http://127.0.0.1:${peer_port}" --initial-advertise-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-cluster="node-rig=http://127.0.0.1:${peer_port}" --listen-metrics-urls= \
    --unsafe-no-fsync=true --log-level=warn
  local pki=${dir}/pki
  spawn "${dir}" kube-apiserver "${k8s_bin}/kube-apiserver" \
    --bind-address="${NODE_IP}" --advertise-address="${NODE_IP}" --secure-port="${API_PORT}" \
    --etcd-servers="http://127.0.0.1:${etcd_port}" \
    --tls-cert-file="${pki}/apiserver.crt" --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${pki}/sa.pub" --service-account-signing-key-file="${pki}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" --allow-privileged=true \
    --kubelet-client-certificate="${pki}/apiserver-kubelet-client.crt" \
    --kubelet-client-key="${pki}/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --enable-priority-and-fairness=false --profiling=false --v=0
  spawn "${dir}" containerd /usr/bin/containerd --config "${dir}/containerd/config.toml"
  local kc="${k8s_bin}/kubectl --kubeconfig ${dir}/admin.kubeconfig"
  apiserver_ready() { [[ $(${kc} get --raw /readyz 2>/dev/null) == ok ]]; }
  wait_for 60 "apiserver ready" apiserver_ready || fail_up "${dir}" "kube-apiserver did not become ready"

  spawn "${dir}" kube-controller-manager "${NODE_BIN}/kube-controller-manager" \
    --kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --bind-address="${NODE_IP}" --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="${pki}/sa.key" --root-ca-file="${pki}/ca.crt" \
    --cluster-signing-cert-file="${pki}/ca.crt" --cluster-signing-key-file="${pki}/ca.key" \
    --controllers='*,-bootstrapsigner,-tokencleaner' --profiling=false --v=0
  spawn "${dir}" kube-scheduler "${NODE_BIN}/kube-scheduler" \
    --kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --bind-address="${NODE_IP}" --leader-elect=false --profiling=false --v=0
  local ctr="ctr --address ${dir}/containerd/containerd.sock"
  wait_for 30 "containerd ready" ${ctr} version || fail_up "${dir}" "containerd did not start"
  # The sandbox image must be there before the first pod (there is no registry).
  local pause_tar
  pause_tar=$("${HACK_DIR}/node-images.sh" pause | tail -n 1)
  ${ctr} -n k8s.io images import --no-unpack=false "${pause_tar}" >/dev/null ||
    fail_up "${dir}" "could not import the pause image"
  spawn "${dir}" kubelet "${NODE_BIN}/kubelet" --config="${dir}/kubelet/config.yaml" \
    --kubeconfig="${dir}/kubelet.kubeconfig" --root-dir="${dir}/kubelet/root" \
    --cert-dir="${dir}/kubelet/pki" --hostname-override="${NODE_NAME}" --node-ip="${NODE_IP}" \
    --oom-score-adj=0 --v=0
  spawn "${dir}" kube-proxy "${NODE_BIN}/kube-proxy" --config="${dir}/kube-proxy.yaml" --v=0
  node_ready() { [[ $(${kc} get node "${NODE_NAME}" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]; }
  wait_for "${READY_TIMEOUT}" "node Ready" node_ready || fail_up "${dir}" "the node did not become Ready"
  sa_ready() { ${kc} -n default get serviceaccount default; }
  wait_for 30 "default ServiceAccount" sa_ready || fail_up "${dir}" "no default ServiceAccount"
  {
    echo "KUBECONFIG=${dir}/admin.kubeconfig"
    echo "KUBECTL=${k8s_bin}/kubectl"
    echo "HELM=${k8s_bin}/helm"
    echo "CONTAINERD_SOCK=${dir}/containerd/containerd.sock"
    echo "NODE_NAME=${NODE_NAME}"
    echo "NODE_IP=${NODE_IP}"
    echo "APISERVER_URL=https://${NODE_IP}:${API_PORT}"
    echo "POD_CIDR=${POD_CIDR}"
    echo "SERVICE_CIDR=${SERVICE_CIDR}"
  } >"${dir}/env.tmp"
  mv -f "${dir}/env.tmp" "${dir}/env"
  log "node up in $((SECONDS - T0))s; tear down with: $0 down ${dir}"
  cat "${dir}/env"
}

fail_up() {
  local dir=$1 f
  for f in "${dir}"/log/*.log; do
    log "---- last lines of ${f} ----"
    tail -n 15 "${f}" >&2 || true
  done
  cmd_down "${dir}" || true
  die "$2 (logs were in ${dir}/log)"
}

node_healthy() {
  local dir=$1 c
  [[ -s ${dir}/env ]] || return 1
  for c in "${COMPONENTS[@]}"; do alive "${dir}" "${c}" || return 1; done
}

stop() { # DIR NAME...: TERM, then KILL after 10 s
  local dir=$1 pids=() n pid i
  shift
  for n in "$@"; do
    if alive "${dir}" "${n}"; then
      read -r pid <"${dir}/run/${n}.pid"
      pids+=("${pid}")
      kill -TERM "${pid}" 2>/dev/null || true
    fi
    rm -f "${dir}/run/${n}.pid"
  done
  for ((i = 0; i < 100; i++)); do
    local left=
    for pid in "${pids[@]}"; do kill -0 "${pid}" 2>/dev/null && left=1; done
    [[ -z ${left} ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
}

# Container processes by the PIDs their shims recorded (init.pid; the shim is its parent): the
# inits, then the shims. Also notes the sandboxes' network namespaces and CNI cache entries.
kill_containers() {
  local dir=$1 f pid ppid ns id shims=()
  local tasks=${dir}/containerd/state/io.containerd.runtime.v2.task
  [[ -d ${tasks} ]] || return 0
  for f in "${tasks}"/*/*/init.pid; do
    [[ -r ${f} ]] || continue
    id=$(basename "$(dirname "${f}")")
    echo "${id}" >>"${dir}/run/sandboxes"
    pid=$(tr -dc 0-9 <"${f}")
    [[ -n ${pid} && -d /proc/${pid} ]] || continue
    # A sandbox's network namespace is named by containerd under /run/netns.
    ns=$(ip netns identify "${pid}" 2>/dev/null || true)
    [[ -n ${ns} ]] && echo "${ns}" >>"${dir}/run/netns"
    ppid=$(awk '{print $4}' "/proc/${pid}/stat" 2>/dev/null || true)
    [[ -n ${ppid} && ${ppid} != 1 ]] && grep -q containerd-shim "/proc/${ppid}/cmdline" 2>/dev/null && shims+=("${ppid}")
    kill -KILL "${pid}" 2>/dev/null || true
  done
  sleep 0.2
  for pid in "${shims[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
}

unmount_under() { # every mount below DIR, deepest first
  local dir=$1 m i
  for ((i = 0; i < 3; i++)); do
    local mounts=()
    while read -r m; do mounts+=("${m}"); done < <(awk -v d="${dir}/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    ((${#mounts[@]})) || return 0
    for m in "${mounts[@]}"; do umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null || true; done
  done
}

# The iptables chains the kubelet, kube-proxy and the portmap plugin make (there is no other
# node on this machine), and the rig's own.
clean_iptables() {
  local ipt t c
  for ipt in iptables ip6tables; do
    command -v "${ipt}" >/dev/null 2>&1 || continue
    for t in filter nat mangle; do
      local chains
      chains=$(${ipt} -w -t "${t}" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^(KUBE-|CNI-)/ || $2 == "'"${FW_CHAIN}"'") {print $2}')
      [[ -n ${chains} ]] || continue
      # Drop every rule that jumps to one of them, then flush and delete them.
      local rule
      while read -r rule; do
        eval "${ipt} -w -t ${t} ${rule/-A/-D}" 2>/dev/null || true
      done < <(${ipt} -w -t "${t}" -S 2>/dev/null | grep -E '^-A ' | grep -E -- "-j (KUBE-|CNI-|${FW_CHAIN})" || true)
      for c in ${chains}; do ${ipt} -w -t "${t}" -F "${c}" 2>/dev/null || true; done
      for c in ${chains}; do ${ipt} -w -t "${t}" -X "${c}" 2>/dev/null || true; done
    done
  done
}

remove_cgroups() {
  local h d
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    for d in "${h}kubepods" "${h}kubepods.slice"; do
      [[ -d ${d} ]] || continue
      find "${d}" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
  done
}

cmd_down() {
  local dir
  dir=$(abs_dir "$1")
  T0=$SECONDS
  [[ -d ${dir}/run ]] || { log "nothing to tear down in ${dir}"; return 0; }
  local node_bin_kp=${NODE_BIN}/kube-proxy
  stop "${dir}" kubelet
  kill_containers "${dir}"
  stop "${dir}" containerd kube-proxy kube-controller-manager kube-scheduler
  stop "${dir}" kube-apiserver
  stop "${dir}" etcd
  [[ -x ${node_bin_kp} ]] && "${node_bin_kp}" --cleanup >/dev/null 2>&1 || true
  clean_iptables
  local ns
  if [[ -r ${dir}/run/netns ]]; then
    while read -r ns; do ip netns del "${ns}" 2>/dev/null || true; done <"${dir}/run/netns"
    rm -f "${dir}/run/netns"
  fi
  unmount_under "${dir}"
  remove_cgroups
  # libcni's result cache (/var/lib/cni/results/NETWORK-SANDBOXID-IFNAME) of our sandboxes.
  if [[ -r ${dir}/run/sandboxes ]]; then
    local id
    while read -r id; do rm -f /var/lib/cni/results/*-"${id}"-* 2>/dev/null || true; done <"${dir}/run/sandboxes"
  fi
  ip link del "${BRIDGE}" 2>/dev/null || true
  restore_sysctls "${dir}"
  if [[ -r ${CURRENT} ]] && [[ $(cat "${CURRENT}") == "${dir}" ]]; then rm -f "${CURRENT}"; fi
  # State that would make the next `up` in DIR inconsistent (the PKI is kept: it is slow-ish).
  rm -rf --one-file-system "${dir}/containerd" "${dir}/kubelet" "${dir}/etcd" "${dir}/cni" "${dir}/run" "${dir}/env"
  log "down in $((SECONDS - T0))s"
}

# leftovers DIR: list what a rig in DIR left on this machine (nothing after a good `down`).
cmd_leftovers() {
  local dir n=0 p k v cur
  dir=$(abs_dir "$1")
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"${p}/cmdline" | grep -qF "${dir}/"; then
      echo "process ${p#/proc/}: $(tr '\0' ' ' 2>/dev/null <"${p}/cmdline" | cut -c1-120)"; n=$((n + 1))
    fi
  done
  while read -r p; do echo "mount ${p}"; n=$((n + 1)); done < <(awk -v d="${dir}/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo)
  for p in /sys/fs/cgroup/*/kubepods* /sys/fs/cgroup/kubepods*; do [[ -e ${p} ]] && { echo "cgroup ${p}"; n=$((n + 1)); }; done
  ip link show "${BRIDGE}" >/dev/null 2>&1 && { echo "bridge ${BRIDGE}"; n=$((n + 1)); }
  # The bridge plugin names the host ends veth<hex>; other tests' veths have their own names.
  while read -r p; do echo "link ${p}"; n=$((n + 1)); done < <(ip -o link show type veth 2>/dev/null | awk -F': ' '$2 ~ /^veth[0-9a-f]+@/ {print $2}')
  for p in iptables ip6tables; do
    while read -r k; do echo "${p} chain ${k}"; n=$((n + 1)); done < <(${p}-save 2>/dev/null | awk '/^:(KUBE-|CNI-|'"${FW_CHAIN}"')/ {print substr($1, 2)}')
  done
  for p in /var/lib/cni/results/*; do [[ -e ${p} ]] && { echo "cni cache ${p}"; n=$((n + 1)); }; done
  if [[ -r ${dir}/sysctl.before ]]; then
    while IFS== read -r k v; do
      [[ -r /proc/sys/${k} ]] && read -r cur <"/proc/sys/${k}" && [[ ${cur} != "${v}" ]] && { echo "sysctl ${k}=${cur} (was ${v})"; n=$((n + 1)); }
    done <"${dir}/sysctl.before"
  fi
  ((n == 0)) && echo "node-rig: nothing left"
  ((n == 0))
}

cmd_status() {
  local dir c
  dir=$(abs_dir "$1")
  for c in "${COMPONENTS[@]}"; do
    if alive "${dir}" "${c}"; then echo "${c}: running"; else echo "${c}: stopped"; fi
  done
}

case ${1:-} in
  build) cmd_build ;;
  check) cmd_check ;;
  up) cmd_up "${2:?usage: $0 up DIR}" ;;
  down) cmd_down "${2:?usage: $0 down DIR}" ;;
  status) cmd_status "${2:?usage: $0 status DIR}" ;;
  leftovers) cmd_leftovers "${2:?usage: $0 leftovers DIR}" ;;
  *) echo "usage: $0 build|check|up DIR|down DIR|status DIR" >&2; exit 2 ;;
esac
