#!/usr/bin/env bash
# Runs the same chatd-bench scenarios against chatd and a baseline server
# in one run, and prints a side-by-side table with the ratio chatd/baseline.
# The baseline is any server binary of the same protocol that takes its
# address (HOST:PORT) as its only argument; BENCHMARKS.md used the async-std
# book's tutorial chat server ported to tokio, and says how to build it.
#
#   benches/compare.sh BASELINE_BINARY
#
# Environment: DURATION (traffic seconds, default 10), SCALE_DURATION (for
# scale19k, default 30), SCENARIOS (space separated subset of: idle10k
# fanout1 fanout10 rate100k storm10k storm19k scale19k),
# OUT (directory for the JSON results, default target/compare).
# Each traffic scenario also leaves its latency histogram beside its JSON,
# $OUT/<scenario>.<server>.hgrm (HdrHistogram percentile distribution, µs);
# benches/charts.py draws them.
# Traffic goes to 127.0.0.1 only. Each scenario gets a fresh server process:
# the tutorial server never frees a name, and stops routing for good once a
# message is sent to a client that has disconnected.
set -euo pipefail
cd "$(dirname "$0")/.."

baseline=${1:?usage: benches/compare.sh BASELINE_BINARY}
baseline=$(realpath "$baseline")
duration=${DURATION:-10}
scale_duration=${SCALE_DURATION:-30}
scenarios=${SCENARIOS:-"idle10k fanout1 fanout10 rate100k storm10k storm19k scale19k"}
out=${OUT:-target/compare}
mkdir -p "$out"

cargo build --release --quiet --bin chatd --bin chatd-bench
chatd=target/release/chatd
bench=target/release/chatd-bench

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_listening() { # port pid
    for _ in $(seq 1 500); do
        ss -ltnH "sport = :$1" | grep -q . && return 0
        kill -0 "$2" 2>/dev/null || { echo "server exited before listening" >&2; return 1; }
        sleep 0.01
    done
    echo "server never listened on $1" >&2
    return 1
}

scenario_args() {
    case $1 in
        idle10k) echo "--clients 10000 --idle 2" ;;
        fanout1) echo "--clients 1000 --senders 100 --fanout 1 --window 32 --duration $duration" ;;
        fanout10) echo "--clients 1000 --senders 100 --fanout 10 --window 32 --duration $duration" ;;
        rate100k) echo "--clients 1000 --senders 100 --fanout 1 --rate 100000 --duration $duration" ;;
        storm10k) echo "--clients 10000" ;;
        storm19k) echo "--clients 19000" ;;
        scale19k) echo "--clients 19000 --senders 19000 --fanout 1 --window 1 --duration $scale_duration" ;;
        *) echo "unknown scenario $1" >&2; return 1 ;;
    esac
}

run_one() { # server-name scenario
    local port pid args
    port=$(free_port)
    if [ "$1" = chatd ]; then
        "$chatd" --addr "127.0.0.1:$port" --log-level warn 2>"$out/$2.chatd.log" &
    else
        "$baseline" "127.0.0.1:$port" >/dev/null 2>"$out/$2.baseline.log" &
    fi
    pid=$!
    wait_listening "$port" "$pid"
    args=$(scenario_args "$2")
    echo "== $2 / $1: chatd-bench $args" >&2
    # shellcheck disable=SC2086
    "$bench" --addr "127.0.0.1:$port" --server-pid "$pid" --json --hgrm "$out/$2.$1.hgrm" $args \
        >"$out/$2.$1.json" || true
    kill -INT "$pid" 2>/dev/null || true
    sleep 0.2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

for scenario in $scenarios; do
    run_one chatd "$scenario"
    run_one baseline "$scenario"
done

python3 - "$out" $scenarios <<'PY'
import json, sys
out, scenarios = sys.argv[1], sys.argv[2:]
metrics = {
    "idle10k": ["logged_in", "server_bytes_per_conn"],
    "fanout1": ["deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
    "fanout10": ["deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
    "rate100k": ["lines_sent", "latency_us_p50", "latency_us_p99", "latency_us_p999", "latency_us_max", "send_lag_us_p99", "server_cpu_us_per_delivery", "lost"],
    "storm10k": ["logged_in", "logins_per_sec", "login_ms_p50", "login_ms_p99", "login_ms_max", "connect_failed"],
    "storm19k": ["logged_in", "logins_per_sec", "login_ms_p50", "login_ms_p99", "login_ms_max", "connect_failed"],
    "scale19k": ["logged_in", "deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
}
def load(name):
    try:
        with open(f"{out}/{name}.json") as f:
            return json.load(f)
    except Exception:
        return {}
print(f"| scenario | figure | chatd | baseline | chatd/baseline |")
print(f"|---|---|---:|---:|---:|")
for s in scenarios:
    c, b = load(f"{s}.chatd"), load(f"{s}.baseline")
    for m in metrics[s] + ["result"]:
        cv, bv = c.get(m, "-"), b.get(m, "-")
        fmt = lambda v: f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))
        ratio = f"{cv / bv:.3f}" if isinstance(cv, (int, float)) and isinstance(bv, (int, float)) and bv else "-"
        print(f"| {s} | {m} | {fmt(cv)} | {fmt(bv)} | {ratio} |")
PY
