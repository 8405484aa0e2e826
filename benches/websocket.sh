#!/usr/bin/env bash
# The WebSocket table of BENCHMARKS.md, in one run: the same chatd-bench
# scenarios against chatd over TCP, chatd over WebSocket, and two WebSocket
# baselines that speak the same broker protocol: the tutorial's broker on
# tokio-tungstenite (a Rust binary taking HOST:PORT) and Node.js with the
# `ws` package (a directory holding server.js and its node_modules).
#
#   benches/websocket.sh TUNGSTENITE_BINARY WS_NODE_DIR
#
# Environment: DURATION (traffic seconds, default 10), SCALE_DURATION (for
# scale19k, default 30), SCENARIOS (a subset of: idle10k fanout1 fanout10
# rate100k scale19k), SERVERS (a subset of: chatd-tcp chatd-ws tungstenite
# ws-node), OUT (results, default target/websocket).
# Each scenario gets a fresh server process; traffic goes to 127.0.0.1 only;
# every server this script starts is stopped, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

tungstenite=$(realpath "${1:?usage: benches/websocket.sh TUNGSTENITE_BINARY WS_NODE_DIR}")
ws_node=$(realpath "${2:?usage: benches/websocket.sh TUNGSTENITE_BINARY WS_NODE_DIR}")
[ -f "$ws_node/server.js" ] && [ -d "$ws_node/node_modules/ws" ] || {
    echo "$ws_node needs server.js and node_modules/ws (npm ci there)" >&2
    exit 1
}
command -v node >/dev/null || { echo "node is not installed" >&2; exit 1; }
duration=${DURATION:-10}
scale_duration=${SCALE_DURATION:-30}
scenarios=${SCENARIOS:-"idle10k fanout1 fanout10 rate100k scale19k"}
servers=${SERVERS:-"chatd-tcp chatd-ws tungstenite ws-node"}
out=${OUT:-target/websocket}
mkdir -p "$out"

cargo build --release --quiet --bin chatd --bin chatd-bench
chatd=target/release/chatd
bench=target/release/chatd-bench

pid=
stop() {
    [ -n "$pid" ] || return 0
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}
trap stop EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_listening() { # port
    for _ in $(seq 1 1000); do
        ss -ltnH "sport = :$1" | grep -q . && return 0
        kill -0 "$pid" 2>/dev/null || { echo "server exited before listening" >&2; return 1; }
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
        scale19k) echo "--clients 19000 --senders 19000 --fanout 1 --window 1 --duration $scale_duration" ;;
        *) echo "unknown scenario $1" >&2; return 1 ;;
    esac
}

run_one() { # server scenario
    local port ws_port args transport=--ws
    port=$(free_port)
    case $1 in
        chatd-tcp)
            "$chatd" --addr "127.0.0.1:$port" --log-level warn 2>"$out/$2.$1.log" &
            transport= ;;
        chatd-ws)
            ws_port=$port
            port=$(free_port)
            "$chatd" --addr "127.0.0.1:$port" --ws-addr "127.0.0.1:$ws_port" --log-level warn \
                2>"$out/$2.$1.log" &
            port=$ws_port ;;
        tungstenite) "$tungstenite" "127.0.0.1:$port" >/dev/null 2>"$out/$2.$1.log" & ;;
        ws-node) node "$ws_node/server.js" "127.0.0.1:$port" >/dev/null 2>"$out/$2.$1.log" & ;;
        *) echo "unknown server $1" >&2; return 1 ;;
    esac
    pid=$!
    wait_listening "$port"
    args=$(scenario_args "$2")
    echo "== $2 / $1: chatd-bench $transport $args" >&2
    # shellcheck disable=SC2086
    "$bench" $transport --addr "127.0.0.1:$port" --server-pid "$pid" --json \
        --hgrm "$out/$2.$1.hgrm" $args >"$out/$2.$1.json" || true
    stop
}

for scenario in $scenarios; do
    for server in $servers; do
        run_one "$server" "$scenario"
    done
done

python3 - "$out" "$scenarios" "$servers" <<'PY'
import json, sys
out, scenarios, servers = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
metrics = {
    "idle10k": ["logged_in", "server_bytes_per_conn", "login_ms_p99"],
    "fanout1": ["deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
    "fanout10": ["deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
    "rate100k": ["lines_sent", "latency_us_p50", "latency_us_p99", "latency_us_p999", "send_lag_us_p99", "server_cpu_us_per_delivery", "lost"],
    "scale19k": ["logged_in", "deliveries_per_sec", "server_cpu_us_per_delivery", "latency_us_p50", "latency_us_p99", "lost", "bench_cpu_secs"],
}
def load(name):
    try:
        with open(f"{out}/{name}.json") as f:
            return json.load(f)
    except Exception:
        return {}
def fmt(v):
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".")
    return f"{v:,}" if isinstance(v, int) else str(v)
print("| scenario | figure | " + " | ".join(servers) + " |")
print("|---|---|" + "---:|" * len(servers))
for s in scenarios:
    runs = [load(f"{s}.{server}") for server in servers]
    for m in metrics[s] + ["result"]:
        print(f"| {s} | {m} | " + " | ".join(fmt(r.get(m, "-")) for r in runs) + " |")
PY
