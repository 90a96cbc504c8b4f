#!/usr/bin/env bash
# Builds the node rig's images as docker-archive tars (hack/docker-archive.py) and prints the
# tar's path as the last stdout line:
#
#   hack/node-images.sh pause          registry.k8s.io/pause:3.10   (the sandbox image)
#   hack/node-images.sh echo           tollgate-test/echo:1         (HTTP echo backend, :8080)
#   hack/node-images.sh llm            tollgate-test/llm:1          (streaming chat backend, :8080)
#   hack/node-images.sh gateway [TAG]  tollgate:TAG (default: Cargo.toml's version), built as the
#                                      Dockerfile builds it: a static musl release binary
#
# pause/echo/llm are one std-only program (hack/node-images/backend.rs) built by rustc alone and
# cached under ${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/node-images/; the gateway's tar
# goes to target/node-images/. Import with `ctr -n k8s.io images import TAR`.
set -euo pipefail
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${HACK_DIR}/.." && pwd)
CACHE=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/node-images
MUSL=x86_64-unknown-linux-musl
log() { echo "node-images: $*" >&2; }

backend_bin() {
  local src=${HACK_DIR}/node-images/backend.rs sum target=${MUSL}
  sum=$(cksum <"${src}" | cut -d' ' -f1)
  local bin=${CACHE}/backend-${sum}
  if [[ ! -x ${bin} ]]; then
    mkdir -p "${CACHE}"
    # Static either way: musl when its target is installed, else glibc's static libraries.
    local flags=(--target "${MUSL}")
    rustup target list --installed 2>/dev/null | grep -qx "${MUSL}" || flags=(-C target-feature=+crt-static)
    rustc --edition 2021 -O -C strip=symbols -D warnings "${flags[@]}" "${src}" -o "${bin}.tmp" >&2
    mv -f "${bin}.tmp" "${bin}"
  fi
  echo "${bin}"
}

small_image() { # NAME TAG ARGS...
  local name=$1 tag=$2 bin out
  shift 2
  bin=$(backend_bin)
  out=${CACHE}/${name}-$(basename "${bin}" | cut -d- -f2)-r1.tar
  if [[ ! -s ${out} ]]; then
    python3 "${HACK_DIR}/docker-archive.py" --tag "${tag}" --out "${out}" \
      --file "${bin}:/backend:0755" --dir /tmp:1777 --user 65532 "$@"
  fi
  echo "${out}"
}

gateway() {
  local tag=${1:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "${REPO}/Cargo.toml" | head -n 1)}
  rustup target list --installed 2>/dev/null | grep -qx "${MUSL}" || rustup target add "${MUSL}" >&2
  command -v musl-gcc >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends musl-tools >&2
  log "cargo build --release --target ${MUSL} --bin tollgate (as the Dockerfile)"
  (cd "${REPO}" && nice -n 10 cargo build --locked --release --target "${MUSL}" --bin tollgate >&2)
  local target_dir
  target_dir=$(cd "${REPO}" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  mkdir -p "${target_dir}/node-images"
  local out=${target_dir}/node-images/tollgate-${tag}.tar
  python3 "${HACK_DIR}/docker-archive.py" gateway --dockerfile "${REPO}/Dockerfile" \
    --binary "${target_dir}/${MUSL}/release/tollgate" --tag "tollgate:${tag}" --out "${out}"
  echo "${out}"
}

case ${1:-} in
  pause) small_image pause registry.k8s.io/pause:3.10 --entrypoint '["/backend","pause"]' ;;
  echo) small_image echo tollgate-test/echo:1 --entrypoint '["/backend","echo"]' --expose 8080 ;;
  llm) small_image llm tollgate-test/llm:1 --entrypoint '["/backend","llm"]' --expose 8080 ;;
  gateway) gateway "${2:-}" ;;
  *) echo "usage: $0 pause|echo|llm|gateway [TAG]" >&2; exit 2 ;;
esac
