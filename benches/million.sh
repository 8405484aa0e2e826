#!/usr/bin/env bash
# A million clients on one machine, in one name space: Redis, the chatd
# nodes on one port (--cluster, --reuse-port) and chatd-bench as several
# processes, all on loopback; each figure goes to BENCHMARKS.md
# ("A million connections").
#
#   benches/million.sh                      # the full run: 1,000,000 clients
#   CLIENTS=50000 NODES=3 PROCS=3 IDLE=5 DURATION=3 RATES=1000 benches/million.sh
#                                           # the small version .ci/run runs
#
# For each rate in RATES (lines/s) one chatd-bench run connects and logs in
# every client as fast as the machine allows, holds them idle IDLE seconds
# (the script samples CPU, memory and Redis meanwhile), then sends at that
# rate from 1 % of the clients for DURATION seconds while all stay
# connected. While the first run idles, one node is upgraded live
# (SIGUSR2; UPGRADE=0 skips it). Exit status 1 if a client was refused or
# a line lost, or anything the script needs is missing (it says what,
# before starting anything).
#
# Environment: CLIENTS (1000000), NODES (one per 18,900 clients), PROCS
# (generator processes, as many as nodes), IDLE (60), RATES ("10000
# 100000"), DURATION (20), UPGRADE (1), LEASE (--cluster-lease, 30),
# TRANSPORT (tcp, or ws: the clients are WebSocket clients of the nodes'
# --ws-addr, on one port too), LOGIN_WINDOW (chatd-bench --login-window,
# 8000: logins in flight over all generator processes, so that no client
# waits long after its accept; 0 = every connect at once, a storm whose
# tail passes --login-timeout over WebSocket, BENCHMARKS.md),
# SETTLE (chatd-bench --settle-timeout, 300: the longest wait for the
# logins, so that a slow wave is measured to its end, not cut off),
# OUT (target/million).
#
# It stops every process it started, also on failure or Ctrl-C. Traffic
# goes to 127.0.0.0/8 only.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=${CLIENTS:-1000000}
per_node=18900
nodes=${NODES:-$(((clients + per_node - 1) / per_node))}
procs=${PROCS:-$nodes}
idle=${IDLE:-60}
rates=${RATES:-"10000 100000"}
duration=${DURATION:-20}
login_window=${LOGIN_WINDOW:-8000}
settle=${SETTLE:-300}
upgrade=${UPGRADE:-1}
out=${OUT:-target/million}
senders=$((clients / 100))
transport=${TRANSPORT:-tcp}
case $transport in
    tcp | ws) ;;
    *) echo "TRANSPORT is tcp or ws, not $transport" >&2; exit 2 ;;
esac

fail() {
    echo "million.sh: $*" >&2
    exit 1
}

# --- What the run needs, checked before anything starts -----------------
missing=()
for tool in redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || missing+=("$tool (Debian: redis-server, redis-tools, python3)")
done
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
per_process=$(((clients + nodes - 1) / nodes + 200))
if [ "$hard" -lt "$per_process" ]; then
    missing+=("open files: each node needs about $per_process descriptors, the hard limit is $hard: use more NODES (and PROCS)")
fi
per_proc=$(((clients + procs - 1) / procs + 200))
if [ "$hard" -lt "$per_proc" ]; then
    missing+=("open files: each generator process needs about $per_proc descriptors, the hard limit is $hard: use more PROCS")
fi
# Measured here: about 8.4 KB of kernel slab per loopback connection pair,
# 0.2-0.34 KB in chatd, 0.19 KB per name in Redis, 0.32 KB in the
# generator (6.8 GB used in all for a million); 13 KB a client leaves room
# for the waves and the traffic.
need_kb=$((clients * 13 + 512 * 1024))
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
# Inside a container, its memory limit counts, not the host's.
limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || echo max)
if [ "$limit" != max ] && [ $((limit / 1024)) -lt "$avail_kb" ]; then
    avail_kb=$((limit / 1024))
fi
if [ "$avail_kb" -lt "$need_kb" ]; then
    missing+=("memory: about $((need_kb / 1024)) MiB needed, $((avail_kb / 1024)) MiB available")
fi
file_max=$(cat /proc/sys/fs/file-max)
if [ "$file_max" -lt $((2 * clients + 10000)) ]; then
    missing+=("fs.file-max is $file_max: at least $((2 * clients + 10000)) (sysctl -w fs.file-max=...)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "million.sh: this machine lacks what $clients clients need:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

cargo build --release --quiet --bin chatd --bin chatd-bench
target=${CARGO_TARGET_DIR:-$PWD/target}
chatd=$target/release/chatd
bench=$target/release/chatd-bench
rm -rf "$out"
mkdir -p "$out"

# --- Everything started is stopped at the end ----------------------------
pids=()
cleanup() {
    set +e
    # An upgraded node has a new pid: its pid file names it.
    for file in "$out"/node*.pid; do
        [ -f "$file" ] && pids+=("$(cat "$file")")
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_for() { # seconds what command...
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$until" ] || fail "timed out waiting for $what"
        sleep 0.05
    done
}

# --- Redis and the nodes -------------------------------------------------
redis_port=$(free_port)
# Higher priority for Redis where allowed: on a machine with few cores the
# generator and the nodes can otherwise starve it during a wave (see
# docs/CLUSTER.md, "A million on one machine").
nice_redis=()
[ "$(id -u)" = 0 ] && nice_redis=(nice -n -10)
"${nice_redis[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
    --appendonly no --protected-mode no --maxclients $((4 * nodes + 100)) \
    --slowlog-log-slower-than 10000 >"$out/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
rcli() { redis-cli -p "$redis_port" "$@"; }
wait_for 20 "Redis" sh -c "redis-cli -p $redis_port ping 2>/dev/null | grep -q PONG"

# A lease of 30 s instead of 10: two cores shared by 53 nodes, 53
# generator processes and Redis can leave one node without the CPU to renew
# for the 9 s a 10 s lease allows in a wave, and a node that cannot renew
# in time fences, correctly (docs/TUNING.md). On a real server, with a node
# per core, the default is right.
lease=${LEASE:-30}
port=$(free_port)
node_args=()
client_port=$port
bench_args=()
if [ "$transport" = ws ]; then
    client_port=$(free_port)
    node_args=(--ws-addr "127.0.0.1:$client_port")
    bench_args=(--ws)
fi
for i in $(seq 1 "$nodes"); do
    "$chatd" --addr "127.0.0.1:$port" --reuse-port "${node_args[@]}" \
        --cluster "redis://127.0.0.1:$redis_port" --cluster-lease "$lease" \
        --pid-file "$out/node$i.pid" \
        --stats-interval 10 >"$out/node$i.log" 2>&1 &
    node_pid[i]=$!
    pids+=("$!")
done
node_ready() { # i: ready, or fail at once if the node has exited
    grep -q " ready (Redis at " "$out/node$1.log" && return 0
    kill -0 "${node_pid[$1]}" 2>/dev/null || {
        tail -5 "$out/node$1.log" >&2
        fail "node $1 exited (its log: $out/node$1.log)"
    }
    return 1
}
for i in $(seq 1 "$nodes"); do
    wait_for 20 "node $i" node_ready "$i"
done
echo "== $nodes nodes on 127.0.0.1:$port ($transport clients on port $client_port), Redis on $redis_port" >&2

# --- Sampling ------------------------------------------------------------
# Once a second (benches/million_sample.py, one process that forks
# nothing): the nodes' CPU ticks and PSS, the generator's RSS, Redis's CPU,
# commands and memory, kernel slab, MemAvailable, the keys in Redis, the
# generator's CPU ticks, the machine's busy ticks and the slab in /proc
# inodes.
sampler=(python3 benches/million_sample.py "$out" "$redis_port" "$redis_pid")
"${sampler[@]}" once # the machine before any client
"${sampler[@]}" &
pids+=("$!")

# --- The runs ------------------------------------------------------------
status=0
run=0
# One source address per 1,000 clients, a new range each run (the last
# run's closed connections wait in TIME_WAIT): Linux's connect searches the
# port range of its address, and the generator's connects slow down many
# times over as that range fills.
addresses=$((clients / 1000 > procs ? clients / 1000 : procs))
for rate in $rates; do
    run=$((run + 1))
    echo "== run $run: $clients clients, idle $idle s, $senders senders at $rate lines/s for $duration s" >&2
    date +%s.%N >"$out/run$run.start" # the login wave's CPU counts from here
    "$bench" "${bench_args[@]}" --addr "127.0.0.1:$client_port" --clients "$clients" --procs "$procs" \
        --source-ips "127.$((19 + run)).0.1-127.$((19 + run)).$((addresses / 256)).$((addresses % 256))" \
        --name-prefix "r$run" --idle "$idle" --senders "$senders" --rate "$rate" \
        --duration "$duration" --login-window "$login_window" --settle-timeout "$settle" --json \
        >"$out/run$run.json" 2> >(while IFS= read -r line; do
            printf '%s %s\n' "$(date +%s.%N)" "$line"
        done >"$out/run$run.progress") &
    bench_pid=$!
    pids+=("$bench_pid")
    if [ "$run" = 1 ] && [ "$upgrade" = 1 ]; then
        # A live upgrade of one node while every client is connected and
        # the rest of the cluster runs; the traffic after it goes through
        # the new process. (Not during the traffic: lines routed to a node
        # in the ~50 ms it hands over are refused with `unavailable`, which
        # the generator counts as lost; docs/CLUSTER.md says why.)
        while kill -0 "$bench_pid" 2>/dev/null && ! grep -qs '\[idle\]' "$out/run$run.progress"; do
            sleep 0.2
        done
        if kill -0 "$bench_pid" 2>/dev/null; then
            old=$(cat "$out/node1.pid")
            echo "== live upgrade of node 1 (pid $old)" >&2
            date +%s.%N >"$out/upgrade.at"
            kill -USR2 "$old"
            wait_for 30 "the upgrade" sh -c "[ \"\$(cat $out/node1.pid)\" != $old ]"
            echo "== node 1 is pid $(cat "$out/node1.pid") now" >&2
        fi
    fi
    wait "$bench_pid" || status=1
    rcli slowlog get 20 >"$out/run$run.slowlog" || true
    # The next run's login wave starts once this run's logout wave is over
    # (every name released), so that each run measures one wave.
    wait_for 600 "the logout wave" sh -c "[ \"\$(redis-cli -p $redis_port dbsize)\" -le $((2 * nodes + 2)) ]"
    echo "== logged out: $(rcli dbsize) keys left in Redis" >&2
done
rcli info all | tr -d '\r' >"$out/redis-info.txt"

# --- The figures ---------------------------------------------------------
python3 - "$out" "$clients" "$nodes" "$procs" "$idle" "$rates" <<'EOF' | tee "$out/summary.md"
import json, os, sys
out, clients, nodes, procs, idle, rates = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6].split()
hz = os.sysconf("SC_CLK_TCK")
rows = [list(map(float, l.split())) for l in open(f"{out}/samples.txt") if len(l.split()) == 13]
before = rows[0]
def window(start, end):
    w = [r for r in rows if start <= r[0] <= end]
    return (w[0], w[-1]) if len(w) >= 2 else None
def cpu(a, b):
    """% of a core from sample a to b: the nodes, Redis, the generator, and
    the rest of the machine: everything not charged to those processes
    (other processes, kernel threads such as ksoftirqd and kworkers, and
    this script's sampler)."""
    secs = b[0] - a[0]
    ours = [(b[1] - a[1]), (b[4] - a[4]), (b[10] - a[10])]
    rest = (b[11] - a[11]) - sum(ours)
    return [100 * t / hz / secs for t in ours + [rest]]
def listed(b, conns):
    """The part of the slab figure that is /proc inodes, when it counts:
    some process listing every descriptor (on this project's machine,
    the sandbox's agent), not the connections' own cost."""
    extra = (b[12] - before[12]) * 1024 / conns
    return f" (of which {extra:,.0f} B /proc inodes: a process listing descriptors)" if extra > 100 else ""
print(f"# {clients:,} clients, {nodes} nodes, {procs} generator processes\n")
for run, rate in enumerate(rates, 1):
    try:
        r = json.load(open(f"{out}/run{run}.json"))
    except (OSError, ValueError):
        print(f"## Run {run}: the generator gave no result: see {out}/run{run}.progress\n")
        continue
    prog = [l.split(" ", 1) for l in open(f"{out}/run{run}.progress")]
    first = lambda tag: next((float(t) for t, l in prog if l.startswith(tag)), None)
    print(f"## Run {run}: {rate} lines/s\n")
    print(f"- logged in {r.get('logged_in', 0):,} of {r['clients']:,} in {r.get('connect_secs', 0):.1f} s "
          f"({r.get('logins_per_sec', 0):,.0f}/s), login p99 {r.get('login_ms_p99', 0):.0f} ms, "
          f"max {r.get('login_ms_max', 0):.0f} ms; refused or failed {r.get('connect_failed', 0)}, "
          f"closed by the server {r.get('closed_by_server', 0)}, errors {r.get('error_lines', '?')}")
    idle_at = first("[idle]")
    started = float(open(f"{out}/run{run}.start").read())
    wave = window(started, idle_at) if idle_at else None
    if wave:
        node, red, gen, rest = cpu(*wave)
        print(f"- CPU in the login wave ({wave[1][0] - wave[0][0]:.0f} s sampled, {100 * os.cpu_count()} % in all): "
              f"chatd {node:.0f} %, Redis {red:.0f} %, generator {gen:.0f} %, "
              f"the rest of the machine {rest:.0f} %")
    if idle_at and idle >= 10:
        w = window(idle_at + 5, idle_at + idle - 2)
        if w:
            a, b = w
            secs = b[0] - a[0]
            conns = max(r.get("logged_in", 0), 1)
            node, red, _, rest = cpu(a, b)
            print(f"- idle ({secs:.0f} s sampled): chatd {node:.2f} % of a core "
                  f"(all nodes), Redis {red:.2f} %, "
                  f"Redis {(b[5] - a[5]) / secs:,.0f} commands/s; "
                  f"the rest of the machine {rest:.1f} %")
            # Once the wave's tail is over (each login's deadline, 30 s).
            late = window(idle_at + 30, idle_at + idle - 2) if idle >= 40 else None
            if late:
                c, d = late
                t = d[0] - c[0]
                node, red, _, _ = cpu(c, d)
                print(f"- idle from 30 s in ({t:.0f} s): chatd {node:.2f} % of a core, "
                      f"Redis {red:.2f} %, {(d[5] - c[5]) / t:,.0f} commands/s")
            print(f"- memory: chatd {b[2] * 1024 / conns:,.0f} B per connection (PSS of all nodes, "
                  f"{b[2] / 1024:,.0f} MiB), generator {b[3] * 1024 / conns:,.0f} B per connection; "
                  f"kernel slab {(b[7] - before[7]) * 1024 / conns:,.0f} B per connection pair{listed(b, conns)}; "
                  f"Redis used_memory {(b[6] - before[6]) / conns:,.0f} B per name; "
                  f"MemAvailable left {b[8] / 1024 / 1024:.1f} GiB (of {before[8] / 1024 / 1024:.1f} before)")
    print(f"- traffic: {r.get('lines_sent', 0):,} lines, {r.get('deliveries', 0):,} delivered, "
          f"lost {r.get('lost', '?')}, p50 {r.get('latency_us_p50', 0) / 1000:.1f} ms, "
          f"p99 {r.get('latency_us_p99', 0) / 1000:.1f} ms, max {r.get('latency_us_max', 0) / 1000:.1f} ms; "
          f"send lag p99 {r.get('send_lag_us_p99', 0) / 1000:.1f} ms; result {r.get('result')}")
    print()
if os.path.exists(f"{out}/upgrade.at"):
    print("- live upgrade of node 1 while run 1 idled (its log: "
          + "; ".join(l.split("]", 1)[-1].strip() for l in open(f"{out}/node1.log") if "upgrade" in l.lower())[:400] + ")")
EOF
for i in $(seq 1 "$nodes"); do
    grep -H -E "WARN|ERROR" "$out/node$i.log" | head -3
done >&2 || true
exit "$status"
