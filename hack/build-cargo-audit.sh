#!/usr/bin/env bash
# Builds cargo-audit (the RustSec dependency audit CI runs) into a cache outside the
# repository, only when it is missing:
#
#   ${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/cargo-audit-0.22.2/bin/cargo-audit
#
# `cargo install --locked` from crates.io (a few minutes on 2 cores; cached: instant). The
# binary's path is the last line of stdout; progress goes to stderr.
set -euo pipefail

VERSION=0.22.2
ROOT=${TOLLGATE_TOOLS_CACHE:-/var/cache/tollgate-tools}/cargo-audit-${VERSION}
BIN=${ROOT}/bin/cargo-audit

have() { [[ -x ${BIN} ]] && [[ $("${BIN}" --version 2>/dev/null) == "cargo-audit ${VERSION}" ]]; }

if ! have; then
  mkdir -p "${ROOT}"
  # Concurrent runs (several CI jobs on one machine) build once.
  exec 9>"${ROOT}/.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if ! have; then
    echo "building cargo-audit ${VERSION} into ${ROOT}" >&2
    nice -n 10 cargo install --locked cargo-audit --version "${VERSION}" --root "${ROOT}" >&2
  fi
  have || { echo "error: ${BIN} is not cargo-audit ${VERSION} after the build" >&2; exit 1; }
fi
echo "${BIN}"
