#!/usr/bin/env bash
# Runs the Gateway API conformance suite (sigs.k8s.io/gateway-api/conformance v1.6.3, profile
# GATEWAY-HTTP) against Tollgate on the node rig, and prints its counts:
#
#   hack/gateway-conformance.sh [STATE_DIR]   # default: target/tmp/gateway-conformance
#
# Everything the suite runs is built here: its echo-basic backend (under the two tags its base
# manifests name), CoreDNS (which they also run), the suite itself (`go test -c`), and the gateway
# image (hack/node-images.sh gateway; TOLLGATE_GATEWAY_IMAGE names another tar). The suite's
# Go binaries are cached under ${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}.
#
# Output: the suite's log and YAML report in STATE_DIR-out/, then one line
#   conformance GATEWAY-HTTP: passed=N failed=N skipped=N
# and one `FAIL name` line per failing test. Exit 0 when the suite ran, whatever it found
# (the counts are the record); 1 when it could not run at all (no test reported a result);
# 3 when this host cannot run a node (hack/node-rig.sh check says why).
set -euo pipefail
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${HACK_DIR}/.." && pwd)
VERSION=v1.6.3
CACHE_ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}
export GOMODCACHE=${CACHE_ROOT}/gomod
MOD_DIR=${HACK_DIR}/gateway-conformance-tools
STATE=${1:-${REPO}/target/tmp/gateway-conformance}
OUT=${STATE}-out
NS=tollgate-system
log() { echo "gateway-conformance: $*" >&2; }

if ! why=$("${HACK_DIR}/node-rig.sh" check); then
  echo "SKIPPED: ${why}"
  exit 3
fi

# --- the suite and echo-basic, built once -------------------------------------------------------
GC=${CACHE_ROOT}/gateway-conformance-${VERSION}
STAMP="gateway-api/conformance@${VERSION} gomod=$(cksum <"${MOD_DIR}/go.mod" | cut -d' ' -f1)"
if [[ ! -x ${GC}/bin/conformance.test || ! -x ${GC}/bin/echo-basic || $(cat "${GC}/VERSIONS" 2>/dev/null) != "${STAMP}" ]]; then
  mkdir -p "${GC}/bin"
  log "building echo-basic and the conformance suite (${VERSION})"
  (
    cd "${MOD_DIR}"
    export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
    nice -n 10 go build -trimpath -ldflags "-s -w" -o "${GC}/bin/echo-basic.tmp" sigs.k8s.io/gateway-api/conformance/echo-basic
    nice -n 10 go test -c -trimpath -o "${GC}/bin/conformance.test.tmp" sigs.k8s.io/gateway-api/conformance
  )
  mv -f "${GC}/bin/echo-basic.tmp" "${GC}/bin/echo-basic"
  mv -f "${GC}/bin/conformance.test.tmp" "${GC}/bin/conformance.test"
  echo "${STAMP}" >"${GC}/VERSIONS"
fi
COREDNS=$("${HACK_DIR}/build-go-tool.sh" coredns | tail -n 1)
CRDS=$("${HACK_DIR}/gateway-api-crds.sh" | tail -n 1)
GATEWAY_TAR=${TOLLGATE_GATEWAY_IMAGE:-$("${HACK_DIR}/node-images.sh" gateway | tail -n 1)}

# --- images under the names the base manifests use ----------------------------------------------
mkdir -p "${OUT}"
ECHO_TAR=${GC}/echo-basic-r1.tar
[[ -s ${ECHO_TAR} ]] || python3 "${HACK_DIR}/docker-archive.py" --tag registry.k8s.io/gateway-api/echo-basic:v1.5.1 \
  --out "${ECHO_TAR}" --file "${GC}/bin/echo-basic:/echo-basic:0755" --dir /tmp:1777 --user 65532 \
  --entrypoint '["/echo-basic"]'
COREDNS_TAR=$(dirname "${COREDNS}")/coredns-r1.tar
# Root, not the upstream image's nonroot + file capability (a docker-archive layer here carries no
# xattrs): the manifest drops every capability but NET_BIND_SERVICE, which port 53 needs.
[[ -s ${COREDNS_TAR} ]] || python3 "${HACK_DIR}/docker-archive.py" --tag registry.k8s.io/coredns/coredns:v1.12.2 \
  --out "${COREDNS_TAR}" --file "${COREDNS}:/coredns:0755" --dir /tmp:1777 --user 0 \
  --entrypoint '["/coredns"]'

# --- the node -----------------------------------------------------------------------------------
cleanup() {
  "${HACK_DIR}/node-rig.sh" down "${STATE}" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"${HACK_DIR}/node-rig.sh" up "${STATE}" >"${OUT}/env" 2>"${OUT}/node-rig.log"
set -a
# shellcheck disable=SC1091
. "${OUT}/env"
set +a
k() { "${KUBECTL}" "$@"; }
ctr_() { ctr --address "${CONTAINERD_SOCK}" -n k8s.io "$@"; }
for tar in "${ECHO_TAR}" "${COREDNS_TAR}" "${GATEWAY_TAR}"; do ctr_ images import "${tar}" >/dev/null; done
ctr_ images tag --force registry.k8s.io/gateway-api/echo-basic:v1.5.1 registry.k8s.io/gateway-api/echo-basic:v1.6.0-dev.3 >/dev/null

k apply --server-side -f "${CRDS}" >/dev/null
k wait --for=condition=Established crd --all --timeout=60s >/dev/null

# --- Tollgate, as the chart installs it, announcing its Service's address on Gateways ------------
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "${REPO}/Cargo.toml" | head -n 1)
tag=$(basename "${GATEWAY_TAR}" .tar); tag=${tag#tollgate-}
helm_() {
  HELM_CONFIG_HOME=${STATE}/helm/config HELM_CACHE_HOME=${STATE}/helm/cache HELM_DATA_HOME=${STATE}/helm/data \
    "${HELM}" "$@"
}
helm_ install tollgate "${REPO}/charts/tollgate" --namespace "${NS}" --create-namespace \
  --set image.repository=tollgate --set "image.tag=${tag:-${version}}" --set replicaCount=1 >/dev/null
ip=$(k -n "${NS}" get service tollgate -o jsonpath='{.spec.clusterIP}')
helm_ upgrade tollgate "${REPO}/charts/tollgate" --namespace "${NS}" --reuse-values \
  --set "extraArgs={--gateway-address=${ip}}" >/dev/null
k -n "${NS}" rollout status deployment/tollgate --timeout=180s >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: tollgate}
spec: {controllerName: tollgate.dev/gateway-controller}
EOF
k wait --for=condition=Accepted gatewayclass/tollgate --timeout=60s >/dev/null
log "Tollgate ${tag:-${version}} serves Gateways at ${ip}; running the suite"

# --- the suite ----------------------------------------------------------------------------------
start=$(date +%s)
set +e
(
  cd "${OUT}"
  timeout 2400 "${GC}/bin/conformance.test" -test.run '^TestConformance$' -test.v -test.timeout 35m \
    --gateway-class=tollgate --conformance-profiles=GATEWAY-HTTP \
    --supported-features=Gateway,HTTPRoute,ReferenceGrant \
    --organization=tollgate --project=tollgate --url=https://github.com/tollgate --version="${version}" \
    --contact=maintainers --report-output="${OUT}/report.yaml" \
    --cleanup-base-resources=false
) >"${OUT}/suite.log" 2>&1
rc=$?
set -e
k -n "${NS}" logs deployment/tollgate --tail=2000 >"${OUT}/tollgate.log" 2>&1 || true
log "suite exited ${rc} after $(($(date +%s) - start))s; log: ${OUT}/suite.log"

# Results of the suite's own tests: `--- PASS: TestConformance/Name (…)`, one level deep.
count() { grep -cE "^    --- $1: TestConformance/[^/ ]+ " "${OUT}/suite.log" || true; }
passed=$(count PASS) failed=$(count FAIL) skipped=$(count SKIP)
echo "conformance GATEWAY-HTTP: passed=${passed} failed=${failed} skipped=${skipped}"
grep -E "^    --- FAIL: TestConformance/[^/ ]+ " "${OUT}/suite.log" | sed -E 's/^    --- FAIL: TestConformance\/([^ ]+).*/FAIL \1/' || true
if ((passed + failed + skipped == 0)); then
  log "the suite ran no test; its last lines:"
  tail -n 40 "${OUT}/suite.log" >&2
  exit 1
fi
