#!/usr/bin/env bash
# The project's test command (README): installs what the tests need on a fresh Debian machine
# (root or sudo), builds the real Kubernetes control plane once (cached outside the repo), then
# runs every test. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "==> real kube-apiserver, etcd, kubectl, helm (built once, cached)"
TOLLGATE_K8S_BIN="$(hack/build-k8s-tools.sh | tail -n 1)"
export TOLLGATE_K8S_BIN
echo "    $TOLLGATE_K8S_BIN"

echo "==> h2spec (built once, cached)"
TOLLGATE_H2SPEC="$(hack/build-go-tool.sh h2spec | tail -n 1)"
export TOLLGATE_H2SPEC
echo "    $TOLLGATE_H2SPEC"

echo "==> MCP Python SDK (pinned; one virtualenv, cached)"
# The MCP tests run the official SDK as servers and clients (tests/support/mcp.rs).
MCP_SDK_VERSION=2.3.0
TOLLGATE_MCP_VENV=/var/cache/tollgate-tools/py-mcp-$MCP_SDK_VERSION
if ! "$TOLLGATE_MCP_VENV/bin/python" -c "import mcp, uvicorn" >/dev/null 2>&1; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  $SUDO mkdir -p /var/cache/tollgate-tools
  $SUDO rm -rf "$TOLLGATE_MCP_VENV"
  $SUDO python3 -m venv "$TOLLGATE_MCP_VENV"
  $SUDO "$TOLLGATE_MCP_VENV/bin/pip" install -q "mcp==$MCP_SDK_VERSION" uvicorn
fi
export TOLLGATE_MCP_PYTHON="$TOLLGATE_MCP_VENV/bin/python"
echo "    $TOLLGATE_MCP_PYTHON"

echo "==> a real node for tests/node.rs (kubelet, containerd, CNI; built once, cached)"
if node_check=$(hack/node-rig.sh check); then
  hack/node-rig.sh build
  # The gateway's image as the Dockerfile builds it (a static musl release binary).
  TOLLGATE_GATEWAY_IMAGE="$(hack/node-images.sh gateway | tail -n 1)"
  export TOLLGATE_GATEWAY_IMAGE
  echo "    $TOLLGATE_GATEWAY_IMAGE"
else
  # tests/node.rs runs the same check and skips its node test, saying why.
  echo "    skipped: ${node_check}"
fi

echo "==> Gateway API standard CRDs (Go module proxy, cached)"
TOLLGATE_GATEWAY_API_CRDS="$(hack/gateway-api-crds.sh | tail -n 1)"
export TOLLGATE_GATEWAY_API_CRDS
echo "    $TOLLGATE_GATEWAY_API_CRDS"

echo "==> Gateway API conformance, GATEWAY-HTTP core, against Tollgate on a node"
# Records the suite's counts (fails only if the suite cannot run at all); needs the node and the
# gateway image built above. Its log and report: target/tmp/gateway-conformance-out/.
if [ -n "${TOLLGATE_GATEWAY_IMAGE:-}" ]; then
  hack/gateway-conformance.sh
else
  echo "    skipped: ${node_check}"
fi

echo "==> cargo test"
cargo test --locked "$@"
