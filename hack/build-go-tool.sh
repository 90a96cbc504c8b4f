#!/usr/bin/env bash
# Builds one Go test tool pinned by a tools module hack/<name>-tools/ (its tools.go imports the
# tool's main package; go.mod pins the version), into a cache outside the repository:
#
#   ${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/<name>-<version>/bin/<name>
#
#   hack/build-go-tool.sh h2spec        # prints the binary's path as the last stdout line
#
# Idempotent and fast when cached (no Go started); concurrent runs are serialized by flock.
set -euo pipefail

NAME=${1:?usage: build-go-tool.sh NAME}
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOD_DIR=${HACK_DIR}/${NAME}-tools
[[ -f ${MOD_DIR}/tools.go ]] || { echo "build-go-tool: no ${MOD_DIR}/tools.go" >&2; exit 1; }
# The tool's main package: the one import of tools.go.
PKG=$(sed -n 's/^[[:space:]]*_ "\(.*\)"$/\1/p' "${MOD_DIR}/tools.go" | head -n 1)
# Its module and version, read from go.mod without running Go (the fast path).
MOD=$(awk -v pkg="${PKG}" '$1 == "require" && index(pkg, $2) == 1 {print $2; exit}
                           $1 != "require" && $1 != "go" && $1 != "module" && $2 ~ /^v/ && index(pkg, $1) == 1 {print $1; exit}' "${MOD_DIR}/go.mod")
VERSION=$(awk -v m="${MOD}" '($1 == "require" && $2 == m) {print $3; exit} ($1 == m) {print $2; exit}' "${MOD_DIR}/go.mod")
[[ -n ${MOD} && -n ${VERSION} ]] || { echo "build-go-tool: ${PKG} not pinned in ${MOD_DIR}/go.mod" >&2; exit 1; }
RECIPE_REV=1
CACHE_ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}
OUT_DIR=${CACHE_ROOT}/${NAME}-${VERSION}
BIN=${OUT_DIR}/bin/${NAME}
STAMP="${MOD}@${VERSION} recipe=${RECIPE_REV} gomod=$(cksum <"${MOD_DIR}/go.mod" | cut -d' ' -f1)"

cached() { [[ -x ${BIN} && -r ${OUT_DIR}/VERSIONS && $(cat "${OUT_DIR}/VERSIONS") == "${STAMP}" ]]; }
if cached; then
  echo "${BIN}"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build-go-tool: no 'go' on PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "${OUT_DIR}/bin"
exec 9>"${OUT_DIR}/.lock"
flock 9
if cached; then
  echo "${BIN}"
  exit 0
fi
start=$(date +%s)
echo "build-go-tool: building ${PKG} (${VERSION})" >&2
(
  cd "${MOD_DIR}"
  GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" \
    nice -n 10 go build -trimpath -ldflags "-s -w" -o "${BIN}.tmp" "${PKG}"
)
mv -f "${BIN}.tmp" "${BIN}"
echo "${STAMP}" >"${OUT_DIR}/VERSIONS"
echo "build-go-tool: ${NAME} done in $(($(date +%s) - start))s" >&2
echo "${BIN}"
