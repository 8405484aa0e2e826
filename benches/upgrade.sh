#!/usr/bin/env bash
# Live upgrades under load: N clients all sending (one line in flight
# each), and chatd upgraded in place (SIGUSR2) three times during the run.
# Reports, for each N, what chatd-bench saw (lost, errors, connections
# closed, the worst latency) and how long each upgrade stopped the server
# (from the old process's last read to the new one's readiness, as the old
# one logs it), with the size of the state handed over.
#
#   benches/upgrade.sh            # N = 1000 10000 19000
#
# Environment: CLIENTS (space separated list of N), DURATION (seconds of
# traffic, default 12; the upgrades come a fifth of it apart, from the
# first progress line on), OUT (default target/upgrade). Traffic goes to
# 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

clients_list=${CLIENTS:-"1000 10000 19000"}
duration=${DURATION:-12}
out=${OUT:-target/upgrade}
mkdir -p "$out"
cargo build --release --quiet --bin chatd --bin chatd-bench
chatd=$PWD/target/release/chatd
bench=$PWD/target/release/chatd-bench

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

for n in $clients_list; do
    port=$(free_port)
    log="$out/chatd.$n.log"
    "$chatd" --addr "127.0.0.1:$port" >"$log" 2>&1 &
    first=$!
    for _ in $(seq 1 500); do ss -ltnH "sport = :$port" | grep -q . && break; sleep 0.01; done
    "$bench" --addr "127.0.0.1:$port" --clients "$n" --senders "$n" --fanout 1 --window 1 \
        --duration "$duration" --json >"$out/bench.$n.json" 2>"$out/bench.$n.err" &
    gen=$!
    # Wait for the traffic phase, then upgrade three times, a fifth apart.
    until grep -q "\[traffic\]" "$out/bench.$n.err" 2>/dev/null; do sleep 0.1; done
    pid=$first
    for k in 1 2 3; do
        sleep "$(python3 -c "print($duration / 5)")"
        kill -USR2 "$pid"
        until [ "$(grep -c 'upgrade complete: pid' "$log")" -ge "$k" ]; do sleep 0.05; done
        pid=$(grep -o 'upgrade complete: pid [0-9]*' "$log" | tail -1 | awk '{print $4}')
    done
    wait "$gen" || true
    kill -INT "$pid" 2>/dev/null || true
    sleep 1
    kill -KILL "$pid" 2>/dev/null || true
    wait "$first" 2>/dev/null || true
done

python3 - "$out" $clients_list <<'PY'
import json, re, sys
out, ns = sys.argv[1], sys.argv[2:]
def ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
print("| clients | lost | closed by server | error lines | latency p99 (µs) | latency max (µs) | upgrades: stop (ms) | state (bytes) |")
print("|---:|---:|---:|---|---:|---:|---|---|")
for n in ns:
    r = json.load(open(f"{out}/bench.{n}.json"))
    log = open(f"{out}/chatd.{n}.log").read()
    stops = [f"{ms(t):.1f}" for t in re.findall(r"handed over in ([\d.]+\w+)\)", log)]
    sizes = re.findall(r"connection\(s\) \((\d+) bytes of state\)", log)
    print(f"| {int(n):,} | {r.get('lost')} | {r.get('closed_by_server')} | {r.get('error_lines') or '-'} | "
          f"{r.get('latency_us_p99'):,} | {r.get('latency_us_max'):,} | {', '.join(stops)} | {', '.join(sizes)} |")
PY
