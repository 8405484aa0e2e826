#!/usr/bin/env bash
# Cluster scenarios, each measured in one run with the single-node figure
# beside it. Starts its own redis-server (no persistence) and chatd nodes
# on free loopback ports, and stops them all at the end.
#
#   benches/cluster.sh
#
# Environment: DURATION (traffic seconds, default 10), SCENARIOS (space
# separated subset of: local cross saturated scale36k storm reuseport shards), OUT (directory
# for the JSON results, default target/cluster).
# Needs redis-server and redis-cli (Debian: redis-server). Traffic goes to
# 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${DURATION:-10}
scenarios=${SCENARIOS:-"local cross saturated scale36k storm reuseport shards"}
out=${OUT:-target/cluster}
mkdir -p "$out"
cargo build --release --quiet --bin chatd --bin chatd-bench
chatd=${CHATD:-$PWD/target/release/chatd} # CHATD: another build to compare
bench=$PWD/target/release/chatd-bench

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_listening() { # port
    for _ in $(seq 1 500); do
        ss -ltnH "sport = :$1" | grep -q . && return 0
        sleep 0.01
    done
    echo "nothing listens on $1" >&2
    return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_calls() { redis-cli -p "$redis_port" info stats | awk -F: '/^total_commands_processed/ {print $2+0}'; }
# Scripts run (EVALSHA calls): one per claim, release, route or sweep.
redis_scripts() {
    redis-cli -p "$redis_port" info commandstats |
        awk -F'[:=,]' '/^cmdstat_evalsha:/ {print $3+0; found=1} END {if (!found) print 0}'
}

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no >/dev/null 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_listening "$redis_port"

# start_node NAME [ARGS...]: a cluster node (or with plain, a single node)
# on a free port; sets ${NAME}_port and ${NAME}_pid.
start_node() {
    local name=$1 port pid
    shift
    port=$(free_port)
    "$chatd" --addr "127.0.0.1:$port" --log-level warn "$@" 2>"$out/$name.log" &
    pid=$!
    pids+=("$pid")
    wait_listening "$port"
    sleep 0.3 # the cluster link's handshake
    printf -v "${name}_port" %s "$port"
    printf -v "${name}_pid" %s "$pid"
}
stop() { for pid in "$@"; do kill -INT "$pid" 2>/dev/null || true; done; sleep 0.5; }
cluster=(--cluster "redis://127.0.0.1:$redis_port")

# run NAME REDIS? ARGS...: one chatd-bench run; with redis=yes, Redis's CPU
# seconds and commands are added to the JSON.
run() {
    local name=$1 with_redis=$2 ticks calls
    shift 2
    echo "== $name: chatd-bench $*" >&2
    ticks=$(cpu_ticks "$redis_pid")
    calls=$(redis_calls)
    scripts=$(redis_scripts)
    "$bench" --json "$@" >"$out/$name.json" || true
    if [ "$with_redis" = yes ]; then
        python3 - "$out/$name.json" "$(( $(cpu_ticks "$redis_pid") - ticks ))" \
            "$(( $(redis_calls) - calls ))" "$(( $(redis_scripts) - scripts ))" <<'PY'
import json, sys
path, ticks, calls, scripts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = json.load(open(path))
d = max(r.get("deliveries", 0), 1)
r["redis_cpu_secs"] = ticks / 100
r["redis_cpu_us_per_delivery"] = ticks * 1e4 / d
# Commands as Redis counts them: each script, and each command it runs.
r["redis_commands_per_delivery"] = calls / d
r["redis_scripts_per_delivery"] = scripts / d
json.dump(r, open(path, "w"))
PY
    fi
}

for scenario in $scenarios; do
    case $scenario in
    local)
        # Traffic among the clients of one node: a plain node, then a node
        # of a cluster (its peers idle).
        for f in 1 10; do
            start_node single
            run "local.fanout$f.single" no --addr "127.0.0.1:$single_port" --server-pid "$single_pid" \
                --clients 1000 --senders 100 --fanout "$f" --window 32 --duration "$duration"
            stop "$single_pid"
            start_node a "${cluster[@]}"
            start_node b "${cluster[@]}"
            run "local.fanout$f.cluster" yes --addr "127.0.0.1:$a_port" --server-pid "$a_pid" \
                --clients 1000 --senders 100 --fanout "$f" --window 32 --duration "$duration"
            stop "$a_pid" "$b_pid"
        done
        ;;
    cross)
        # Every recipient on the other node, at fixed rates, against the
        # same rates on one node.
        for rate in 10000 50000; do
            start_node single
            run "cross.rate$rate.single" no --addr "127.0.0.1:$single_port" --server-pid "$single_pid" \
                --clients 1000 --senders 100 --fanout 1 --rate "$rate" --duration "$duration"
            stop "$single_pid"
            start_node a "${cluster[@]}"
            start_node b "${cluster[@]}"
            run "cross.rate$rate.cluster" yes --addr "127.0.0.1:$a_port,127.0.0.1:$b_port" \
                --server-pid "$a_pid,$b_pid" \
                --clients 1000 --senders 100 --fanout 1 --rate "$rate" --duration "$duration"
            stop "$a_pid" "$b_pid"
        done
        ;;
    saturated)
        # Closed loop as fast as it goes, every recipient on another node:
        # fan-out 1 over two nodes, fan-out 10 over three; one node alone
        # beside them. Redis's CPU per delivery is the cross-node data
        # plane's cost (BENCHMARKS.md, "Cluster").
        for f in 1 10; do
            start_node single
            run "saturated.fanout$f.single" no --addr "127.0.0.1:$single_port" \
                --server-pid "$single_pid" --clients 1000 --senders 100 --fanout "$f" \
                --window 32 --duration "$duration"
            stop "$single_pid"
        done
        start_node a "${cluster[@]}"
        start_node b "${cluster[@]}"
        run saturated.fanout1.cluster2 yes --addr "127.0.0.1:$a_port,127.0.0.1:$b_port" \
            --server-pid "$a_pid,$b_pid" --clients 1000 --senders 100 --fanout 1 --window 32 \
            --duration "$duration"
        start_node c "${cluster[@]}"
        run saturated.fanout10.cluster3 yes \
            --addr "127.0.0.1:$a_port,127.0.0.1:$b_port,127.0.0.1:$c_port" \
            --server-pid "$a_pid,$b_pid,$c_pid" --clients 1002 --senders 99 --fanout 10 \
            --window 32 --duration "$duration"
        stop "$a_pid" "$b_pid" "$c_pid"
        ;;
    scale36k)
        # More connections than one process may hold here: two nodes with
        # 18,000 clients each, from two generators of 18,000 clients each,
        # every client sending across nodes; then the idle cluster's Redis
        # traffic with 36,000 users logged in.
        start_node a "${cluster[@]}"
        start_node b "${cluster[@]}"
        addrs="127.0.0.1:$a_port,127.0.0.1:$b_port"
        "$bench" --json --addr "$addrs" --server-pid "$a_pid,$b_pid" --name-prefix x \
            --source-ips 127.0.1.1-127.0.1.2 --clients 18000 --senders 18000 --fanout 1 \
            --window 1 --duration "$duration" >"$out/scale36k.x.json" &
        gx=$!
        run scale36k.y yes --addr "$addrs" --server-pid "$a_pid,$b_pid" --name-prefix y \
            --source-ips 127.0.2.1-127.0.2.2 --clients 18000 --senders 18000 --fanout 1 \
            --window 1 --duration "$duration"
        wait "$gx" || true
        # Idle: 36,000 logged in, nobody sending, 10 s of Redis commands.
        "$bench" --json --addr "$addrs" --name-prefix x --source-ips 127.0.1.1-127.0.1.2 \
            --clients 18000 --idle 14 >"$out/idle36k.x.json" &
        gx=$!
        "$bench" --json --addr "$addrs" --name-prefix y --source-ips 127.0.2.1-127.0.2.2 \
            --clients 18000 --idle 14 >"$out/idle36k.y.json" &
        gy=$!
        sleep 3 # logged in by now
        calls=$(redis_calls)
        ticks=$(cpu_ticks "$redis_pid")
        sleep 10
        echo "{\"redis_commands_per_sec\": $(( ($(redis_calls) - calls - 2) / 10 )), \"redis_cpu_secs\": $(( $(cpu_ticks "$redis_pid") - ticks ))e-2, \"names\": $(redis-cli -p "$redis_port" dbsize)}" \
            >"$out/idle36k.redis.json"
        wait "$gx" "$gy" || true
        stop "$a_pid" "$b_pid"
        ;;
    storm)
        # A login storm over two nodes (claims pipelined to Redis), against
        # the same storm on one node.
        start_node single
        run storm18k.single no --addr "127.0.0.1:$single_port" --server-pid "$single_pid" \
            --clients 18000
        stop "$single_pid"
        start_node a "${cluster[@]}"
        start_node b "${cluster[@]}"
        run storm18k.cluster yes --addr "127.0.0.1:$a_port,127.0.0.1:$b_port" \
            --server-pid "$a_pid,$b_pid" --clients 18000
        stop "$a_pid" "$b_pid"
        ;;
    reuseport)
        # Two nodes sharing one port: the kernel spreads the connections.
        port=$(free_port)
        for name in a b; do
            "$chatd" --addr "127.0.0.1:$port" --reuse-port --log-level info "${cluster[@]}" \
                --stats-interval 1 2>"$out/reuseport.$name.log" &
            pids+=("$!")
            printf -v "${name}_pid" %s "$!"
        done
        wait_listening "$port"
        sleep 0.3
        run reuseport yes --addr "127.0.0.1:$port" --server-pid "$a_pid,$b_pid" \
            --clients 2000 --senders 2000 --fanout 1 --window 1 --duration "$duration"
        sleep 1.2
        python3 - "$out" <<'PY' >"$out/reuseport.split.json"
import json, re, sys
out = sys.argv[1]
split = {}
for name in "ab":
    peaks = re.findall(r"peak=(\d+)", open(f"{out}/reuseport.{name}.log").read())
    split[name] = int(peaks[-1]) if peaks else 0
print(json.dumps(split))
PY
        stop "$a_pid" "$b_pid"
        ;;
    shards)
        # Past one Redis: the saturated fan-out-1 scenario over two nodes
        # with the names sharded over 1, 2 and 3 Redis primaries (fresh
        # ones). Redis CPU per delivery, all shards together and each
        # shard's share: each shard should do 1/S of the work. Then one
        # Redis at 1/2 and 1/3 of the senders: the load each shard of two
        # and three carries, for its cost per delivery at that load.
        for run in 1:100 2:100 3:100 1:50 1:33; do
            count=${run%:*} senders=${run#*:}
            shard_pids=() shard_urls=()
            for _ in $(seq 1 "$count"); do
                port=$(free_port)
                redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
                    --protected-mode no >/dev/null 2>&1 &
                shard_pids+=("$!")
                pids+=("$!")
                shard_urls+=("redis://127.0.0.1:$port")
                wait_listening "$port"
            done
            list=$(IFS=,; echo "${shard_urls[*]}")
            start_node a --cluster "$list"
            start_node b --cluster "$list"
            sleep 0.3
            before=()
            for pid in "${shard_pids[@]}"; do before+=("$(cpu_ticks "$pid")"); done
            name="shards$count.fanout1"
            [ "$senders" = 100 ] || name="shards$count.senders$senders"
            echo "== $name: ${#shard_pids[@]} Redis" >&2
            "$bench" --json --addr "127.0.0.1:$a_port,127.0.0.1:$b_port" \
                --server-pid "$a_pid,$b_pid" --clients 1000 --senders "$senders" --fanout 1 \
                --window 32 --duration "$duration" >"$out/$name.json" || true
            used=()
            for i in "${!shard_pids[@]}"; do
                used+=("$(( $(cpu_ticks "${shard_pids[$i]}") - ${before[$i]} ))")
            done
            python3 - "$out/$name.json" "${used[@]}" <<'PY'
import json, sys
path, ticks = sys.argv[1], [int(t) for t in sys.argv[2:]]
r = json.load(open(path))
d = max(r.get("deliveries", 0), 1)
r["redis_cpu_secs"] = sum(ticks) / 100
r["redis_cpu_us_per_delivery"] = sum(ticks) * 1e4 / d
r["shard_cpu_us_per_delivery"] = [round(t * 1e4 / d, 4) for t in ticks]
json.dump(r, open(path, "w"))
PY
            stop "$a_pid" "$b_pid"
            for pid in "${shard_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        done
        ;;
    *) echo "unknown scenario $scenario" >&2; exit 1 ;;
    esac
done

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
keys = ["logged_in", "deliveries_per_sec", "lost", "server_cpu_us_per_delivery",
        "redis_cpu_us_per_delivery", "redis_scripts_per_delivery",
        "redis_commands_per_delivery", "latency_us_p50",
        "latency_us_p99", "login_ms_p99", "login_ms_max", "bench_cpu_secs", "result",
        "redis_commands_per_sec", "redis_cpu_secs", "names", "a", "b",
        "shard_cpu_us_per_delivery"]
print("| run | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for path in sorted(glob.glob(f"{out}/*.json")):
    try:
        r = json.load(open(path))
    except Exception:
        continue
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    print(f"| {os.path.basename(path)[:-5]} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
PY
