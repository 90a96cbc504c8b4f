#!/usr/bin/env bash
# Fetches the Gateway API release's standard-channel CRDs from the Go module proxy (the module
# sigs.k8s.io/gateway-api holds config/crd/standard/) into a cache outside the repository, and
# prints that directory as the last stdout line:
#
#   hack/gateway-api-crds.sh     # .../gomod/sigs.k8s.io/gateway-api@v1.6.3/config/crd/standard
#
# Idempotent and fast when cached (no Go started).
set -euo pipefail

VERSION=v1.6.3
CACHE_ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}
export GOMODCACHE=${CACHE_ROOT}/gomod
DIR=${GOMODCACHE}/sigs.k8s.io/gateway-api@${VERSION}/config/crd/standard
if [[ -r ${DIR}/gateway.networking.k8s.io_httproutes.yaml ]]; then
  echo "${DIR}"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "gateway-api-crds: no 'go' on PATH" >&2; exit 1; }
mkdir -p "${GOMODCACHE}"
echo "gateway-api-crds: downloading sigs.k8s.io/gateway-api@${VERSION}" >&2
# Outside any module: `go mod download` of a module@version only fetches and verifies it.
(cd / && GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@${VERSION}" >/dev/null)
[[ -r ${DIR}/gateway.networking.k8s.io_httproutes.yaml ]] || { echo "gateway-api-crds: ${DIR} missing after download" >&2; exit 1; }
echo "${DIR}"
