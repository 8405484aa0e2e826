#!/usr/bin/env bash
# chatd's WebSocket suite: independent clients (Node's `ws`, hand-made
# sockets, headless Chromium) against the chatd built from this tree.
# Installs what is missing (Debian's chromium and redis-server, the locked
# npm packages), builds chatd, runs `node --test tests/ws/`; exits non-zero
# when anything fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

apt_install() {
    echo "installing $*"
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || {
    echo "tests/ws needs node (20 or later) and npm on PATH" >&2
    exit 1
}
[ -x /usr/bin/chromium ] || apt_install chromium
command -v redis-server >/dev/null 2>&1 || apt_install redis-server

(cd tests/ws && npm ci --no-audit --no-fund --loglevel=error)
cargo build --locked --quiet --bin chatd
export CHATD_BIN="${CHATD_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/chatd}"
node --test tests/ws/
