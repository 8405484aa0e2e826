#!/usr/bin/env bash
# Autobahn|Testsuite conformance run against chatd's WebSocket transport.
#
# Starts `chatd --ws-echo` (the conformance mode: every message echoed back,
# no login or routing) on loopback, runs the suite's fuzzingclient against it
# and judges the report:
#   - sections 1-7 and 10 (framing, ping/pong, reserved bits, opcodes,
#     fragmentation, UTF-8, closing, auto-fragmentation): every case must be
#     OK, NON-STRICT or INFORMATIONAL;
#   - sections 12 and 13 (permessage-deflate): every case must be
#     UNIMPLEMENTED (chatd declines the extension);
#   - section 9 (limits/performance, messages up to 16 MiB): reported with
#     each case's result and duration, judged within chatd's limits (it does
#     not fail the run).
# Exits 1 if the judgement fails, or if the suite cannot be installed or run;
# exits 0 with "skipped: no Python 2.7" when there is no Python 2.7 (the
# suite's last release runs on Python 2 only): the one allowed skip.
#
# Usage: tests/autobahn/run.sh            full run (all cases)
#        QUICK=1 tests/autobahn/run.sh    CI subset: all but section 9 (well under a minute)
#        CASES='1.*,2.*' tests/autobahn/run.sh   chosen cases (or a JSON list)
# Environment:
#   CASES    case patterns for the spec's "cases" ("1.*", "7.7.1", "*"):
#            comma/space separated or a JSON list; default "*" (all)
#   EXCLUDE  patterns for "exclude-cases"; default none (QUICK=1: 9.*, the big-message and
#            performance cases; 12/13 stay: declining deflate is quick)
#   QUICK=1  the CI subset (see EXCLUDE)
#   OUT      output folder; default target/autobahn (reports/ under it:
#            index.html, index.json and one JSON + HTML report per case)
#   SUMMARY  where the markdown summary goes; default docs/autobahn-summary.md
#   PYTHON2  a Python 2.7 interpreter to use instead of pyenv's
#   VENV     the suite's virtualenv; default target/autobahn-venv (built on
#            first use from tests/autobahn/requirements.txt, reused after)
#   WSTEST_TIMEOUT  seconds the suite may run; default 3600 (QUICK: 900)
#   CHATD_ARGS      extra arguments for chatd
# Honours CARGO_TARGET_DIR for the chatd binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
here=$root/tests/autobahn

out=${OUT:-target/autobahn}
summary=${SUMMARY:-docs/autobahn-summary.md}
venv=${VENV:-target/autobahn-venv}
tools=target/autobahn-tools
quick=${QUICK:-0}
[ "$quick" = 0 ] && quick=""
if [ -n "$quick" ]; then
    default_exclude="9.*"
    default_timeout=900
else
    default_exclude=""
    default_timeout=3600
fi
cases=${CASES:-*}
exclude=${EXCLUDE-$default_exclude}
wstest_timeout=${WSTEST_TIMEOUT:-$default_timeout}

say() { echo "autobahn: $*" >&2; }
die() { say "FAIL: $*"; exit 1; }

# --- Python 2.7 -----------------------------------------------------------
is_py27() {
    [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1
}
find_py27() {
    if [ -n "${PYTHON2:-}" ]; then
        is_py27 "$PYTHON2" && { echo "$PYTHON2"; return 0; }
        return 2
    fi
    local pyenv_root=${PYENV_ROOT:-}
    if [ -z "$pyenv_root" ] && command -v pyenv >/dev/null 2>&1; then
        pyenv_root=$(pyenv root 2>/dev/null || true)
    fi
    [ -n "$pyenv_root" ] || pyenv_root=$HOME/.pyenv
    local p
    # Newest 2.7.x that pyenv has, then any python2.7 on PATH.
    while IFS= read -r p; do
        is_py27 "$p/bin/python2.7" && { echo "$p/bin/python2.7"; return 0; }
    done < <(find "$pyenv_root/versions" -mindepth 1 -maxdepth 1 -name '2.7*' 2>/dev/null | sort -V -r)
    p=$(command -v python2.7 2>/dev/null || true)
    [ -n "$p" ] && is_py27 "$p" && { echo "$p"; return 0; }
    return 1
}
py27=$(find_py27) || py27_rc=$?
if [ "${py27_rc:-0}" = 2 ]; then
    die "PYTHON2=$PYTHON2 is not a Python 2.7 interpreter"
elif [ "${py27_rc:-0}" != 0 ]; then
    echo "autobahn: skipped: no Python 2.7 (pyenv install 2.7.18, or set PYTHON2); Autobahn|Testsuite not run"
    exit 0
fi
say "Python 2.7: $py27"

# --- the suite's virtualenv -------------------------------------------------
# Rebuilt when the pins or the interpreter change; reused otherwise.
stamp_want=$(cat "$here/requirements.txt" "$here/bootstrap-requirements.txt" | sha256sum | cut -d' ' -f1)
stamp_want="$stamp_want $py27"
if [ ! -x "$venv/bin/wstest" ] || [ "$(cat "$venv/.chatd-autobahn-stamp" 2>/dev/null)" != "$stamp_want" ]; then
    say "building the suite's virtualenv in $venv (pins: tests/autobahn/requirements.txt)"
    rm -rf "$venv" "$tools"
    mkdir -p "$(dirname "$venv")"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore
    "$py27" -m pip install --quiet --no-deps --target "$tools" -r "$here/bootstrap-requirements.txt" \
        || die "could not install virtualenv for Python 2.7 (tests/autobahn/bootstrap-requirements.txt)"
    VIRTUALENV_OVERRIDE_APP_DATA=$root/$tools/app-data PYTHONPATH=$root/$tools \
        "$py27" -m virtualenv --quiet --no-download --no-periodic-update "$venv" \
        || die "could not create the virtualenv $venv"
    "$venv/bin/python" -m pip install --quiet --no-deps -r "$here/requirements.txt" \
        || die "could not install Autobahn|Testsuite (tests/autobahn/requirements.txt)"
    "$venv/bin/python" -m pip check >/dev/null || die "pip check failed in $venv: $("$venv/bin/python" -m pip check 2>&1)"
    echo "$stamp_want" >"$venv/.chatd-autobahn-stamp"
fi
export PYTHONWARNINGS=ignore # cryptography's "Python 2 is no longer supported"
suite_version=$("$venv/bin/python" -c 'import autobahntestsuite, autobahn; print("autobahntestsuite %s (autobahn %s)" % (autobahntestsuite.version, autobahn.version))')
say "suite: $suite_version"

# --- chatd --------------------------------------------------------------------
cargo build --release --locked --quiet --bin chatd
target=${CARGO_TARGET_DIR:-$root/target}
chatd=$target/release/chatd
help=$("$chatd" --help 2>&1 || true)
for flag in --ws-addr --ws-echo --max-line --max-outbound; do
    grep -q -- "$flag" <<<"$help" || die "chatd --help has no $flag (is the WebSocket transport on this branch?)"
done

rm -rf "$out"
mkdir -p "$out/reports"
log=$out/chatd.log
chatd_pid=""
cleanup() {
    if [ -n "$chatd_pid" ]; then
        kill "$chatd_pid" 2>/dev/null || true
        wait "$chatd_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# shellcheck disable=SC2086
"$chatd" --addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --ws-echo \
    --max-line 16777216 --max-outbound 67108864 ${CHATD_ARGS:-} 2>"$log" &
chatd_pid=$!
ws_addr=""
for _ in $(seq 1 200); do
    ws_addr=$(grep -o -m1 -E 'websocket on ws://([0-9.]+:[0-9]+)/' "$log" 2>/dev/null \
        | sed -E 's|.*ws://([0-9.]+:[0-9]+)/|\1|' || true)
    [ -n "$ws_addr" ] && break
    kill -0 "$chatd_pid" 2>/dev/null || { cat "$log" >&2; die "chatd exited before listening"; }
    sleep 0.05
done
[ -n "$ws_addr" ] || { cat "$log" >&2; die "no 'websocket on ws://ADDR/' line from chatd within 10 s"; }
say "chatd (pid $chatd_pid) websocket on ws://$ws_addr/"

# --- the spec and the run ---------------------------------------------------
spec=$out/fuzzingclient.json
"$venv/bin/python" - "$cases" "$exclude" "ws://$ws_addr/" "$root/$out/reports" >"$spec" <<'EOF'
import json, re, sys
def patterns(s):
    s = s.strip()
    if s.startswith("["):
        return [str(x) for x in json.loads(s)]
    return [x for x in re.split(r"[,\s]+", s) if x]
cases, exclude, url, outdir = sys.argv[1:5]
print(json.dumps({
    "options": {"failByDrop": False},
    "outdir": outdir,
    "servers": [{"agent": "chatd", "url": url}],
    "cases": patterns(cases),
    "exclude-cases": patterns(exclude),
    "exclude-agent-cases": {},
}, indent=2))
EOF
if [ -n "$quick" ]; then mode="quick"; else mode="full"; fi
if [ -n "${CASES:-}" ] || [ "$exclude" != "$default_exclude" ]; then mode="custom"; fi
say "$mode run: cases $(tr -d '\n ' <"$spec" | grep -o '"cases":\[[^]]*\]'), exclude [$exclude]; wstest log in $out/wstest.log"
started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
set +e
(cd "$out" && timeout --kill-after=10 "$wstest_timeout" "$root/$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json) \
    >"$out/wstest.log" 2>&1
rc=$?
set -e
elapsed=$(($(date +%s) - started))
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
kill -0 "$chatd_pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "chatd died during the run (exit status below, log $log)"; }
if [ "$rc" -ne 0 ]; then
    tail -n 30 "$out/wstest.log" >&2
    [ "$rc" -eq 124 ] && die "wstest did not finish within $wstest_timeout s"
    die "wstest exited $rc"
fi
[ -f "$out/reports/index.json" ] || die "wstest wrote no $out/reports/index.json"

# --- the judgement ----------------------------------------------------------------
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
    commit="$commit+uncommitted changes in src"
fi
# The daemon's own last change, which is what the run tested.
src_commit=$(git log -1 --no-merges --format='%h %s' -- src Cargo.toml Cargo.lock 2>/dev/null | cut -c1-100 || true)
[ -n "$src_commit" ] && commit="$commit (src last changed in $src_commit)"
mkdir -p "$(dirname "$summary")"
"$venv/bin/python" "$here/summarize.py" \
    --reports "$out/reports" --spec "$spec" --agent chatd \
    --mode "$mode" --commit "$commit" --elapsed "$elapsed" \
    --load "$load_before before, $load_after after ($(nproc) cores)" \
    --suite "$suite_version" --python "$("$py27" -V 2>&1)" \
    --markdown "$summary"
