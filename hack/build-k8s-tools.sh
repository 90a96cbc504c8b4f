#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries used by Tollgate's
# integration tests (kube-apiserver, kubectl, etcd, helm) from the Go module
# proxy, into a cache outside the repository:
#
#   ${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/k8s-v1.36.3/bin/
#
# Idempotent: when every binary is there (and was built for the versions
# below), it exits at once without touching Go. The bin dir is always the
# last line of stdout; all progress goes to stderr.
#
# Versions are pinned by the tools modules next to this script:
#   hack/k8s-tools   k8s.io/kubernetes (kube-apiserver, kubectl)
#   hack/etcd-tools  go.etcd.io/etcd/server/v3 (etcd)
#   hack/helm-tools  helm.sh/helm/v3 (helm)
# Bump them there and here together (the stamp below keys the cache).
set -euo pipefail

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
# Bump when the build recipe changes, to force a rebuild of cached binaries.
RECIPE_REV=1

CACHE_ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}
OUT_DIR=${CACHE_ROOT}/k8s-${KUBE_VERSION}
BIN_DIR=${OUT_DIR}/bin
STAMP_FILE=${OUT_DIR}/VERSIONS
STAMP="kubernetes=${KUBE_VERSION} etcd=${ETCD_VERSION} helm=${HELM_VERSION} recipe=${RECIPE_REV}"
TOOLS=(kube-apiserver kubectl etcd helm)

# ---- fast path: everything cached (no subprocesses, well under 1 s) ----
cached() {
  local t s=
  for t in "${TOOLS[@]}"; do
    [[ -x ${BIN_DIR}/${t} ]] || return 1
  done
  [[ -r ${STAMP_FILE} ]] && read -r s <"${STAMP_FILE}"
  [[ ${s} == "${STAMP}" ]]
}
if cached; then
  echo "${BIN_DIR}"
  exit 0
fi

log() { echo "build-k8s-tools: $*" >&2; }

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- Go toolchain ----
if ! command -v go >/dev/null 2>&1; then
  for d in /usr/local/go/bin /usr/lib/go/bin "${HOME:-/root}/go/bin"; do
    [[ -x ${d}/go ]] && PATH=${d}:${PATH} && break
  done
fi
command -v go >/dev/null 2>&1 || { log "error: no 'go' on PATH (need Go >= 1.26)"; exit 1; }
# The modules say 'go 1.26.0'. Use the local toolchain; only if it is older
# than that, let Go fetch go1.27.3 through the module proxy.
if [[ -z ${GOTOOLCHAIN:-} ]]; then
  gv=$(GOTOOLCHAIN=local go env GOVERSION)
  gv=${gv#go}
  IFS=. read -r gmaj gmin _ <<<"${gv}"
  if ((gmaj > 1 || (gmaj == 1 && gmin >= 26))); then
    export GOTOOLCHAIN=local
  else
    log "local Go ${gv} is older than 1.26; using GOTOOLCHAIN=go1.27.3"
    export GOTOOLCHAIN=go1.27.3
  fi
fi
export CGO_ENABLED=0
# -mod=mod: tolerate a go.sum that lacks an entry on some other Go version
# (it then records it in the work tree rather than failing the build).
export GOFLAGS="-mod=mod -buildvcs=false"
# Heavy builds share the machine with other work: keep them polite.
NICE=(nice -n 10)

mkdir -p "${CACHE_ROOT}"
# Serialize concurrent invocations (e.g. parallel test jobs on a cold cache).
exec 9>"${CACHE_ROOT}/.k8s-${KUBE_VERSION}.lock"
if command -v flock >/dev/null 2>&1; then
  log "taking build lock ${CACHE_ROOT}/.k8s-${KUBE_VERSION}.lock"
  flock 9
fi
if cached; then
  echo "${BIN_DIR}"
  exit 0
fi

mkdir -p "${BIN_DIR}"
rm -f "${STAMP_FILE}"
TMP_BIN=$(mktemp -d "${OUT_DIR}/.build.XXXXXX")
trap 'rm -rf "${TMP_BIN}"' EXIT

start=$(date +%s)
log "building into ${BIN_DIR} ($(go version), GOTOOLCHAIN=${GOTOOLCHAIN})"

# ---- kube-apiserver + kubectl (one go build, so shared packages compile once) ----
(
  cd "${HACK_DIR}/k8s-tools"
  # Mirror kube::version::ldflags from kubernetes' hack/lib/version.sh so that
  # `kube-apiserver --version` / `kubectl version` report the real release
  # (otherwise the server says v0.0.0-master and kubectl warns about skew).
  # buildDate: the release's publication time (reproducible, unlike `date`).
  # gitCommit: the proxy records no commit for it, so it is left empty.
  build_date=$(go list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes 2>/dev/null || true)
  build_date=${build_date:-1970-01-01T00:00:00Z}
  ver=${KUBE_VERSION#v}
  major=${ver%%.*}
  minor=${ver#*.}
  minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X ${pkg}.gitVersion=${KUBE_VERSION}"
    ldflags+=" -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date}"
    ldflags+=" -X ${pkg}.gitCommit="
  done
  log "go build kube-apiserver kubectl (${KUBE_VERSION}; slow on a cold cache)"
  "${NICE[@]}" go build -trimpath -tags notest,grpcnotrace -ldflags "${ldflags}" \
    -o "${TMP_BIN}/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
)

# ---- etcd ----
(
  cd "${HACK_DIR}/etcd-tools"
  log "go build etcd (${ETCD_VERSION})"
  "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "${TMP_BIN}/etcd" .
)

# ---- helm ----
(
  cd "${HACK_DIR}/helm-tools"
  # As helm's Makefile: version, and the default Kubernetes version used by
  # `helm template` (derived from the k8s.io/client-go it is built with).
  cg=$(go list -m -f '{{.Version}}' k8s.io/client-go)
  cg=${cg#v}
  k8s_major=$((${cg%%.*} + 1))
  k8s_minor=${cg#*.}
  k8s_minor=${k8s_minor%%.*}
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  ldflags+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X ${pkg}.k8sVersionMajor=${k8s_major} -X ${pkg}.k8sVersionMinor=${k8s_minor}"
  done
  log "go build helm (${HELM_VERSION})"
  "${NICE[@]}" go build -trimpath -ldflags "${ldflags}" -o "${TMP_BIN}/helm" helm.sh/helm/v3/cmd/helm
)

for t in "${TOOLS[@]}"; do
  mv -f "${TMP_BIN}/${t}" "${BIN_DIR}/${t}"
done
echo "${STAMP}" >"${STAMP_FILE}"
log "done in $(($(date +%s) - start))s"
echo "${BIN_DIR}"
