#!/usr/bin/env bash
# Does chatd give memory back? Starts chatd, then CYCLES times (default 5)
# connects and logs in CLIENTS clients (default 19000) with chatd-bench and
# lets them all disconnect, printing the server's RSS after each cycle. The
# RSS after the last cycle should be no higher than after the first, give or
# take the few pages glibc's thread cache pins (run with
# GLIBC_TUNABLES=glibc.malloc.tcache_count=0 in front to rule those out).
# Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
cycles=${CYCLES:-5}
clients=${CLIENTS:-19000}
cargo build --release --quiet --bin chatd --bin chatd-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/chatd --addr "127.0.0.1:$port" --log-level warn &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
until ss -ltnH "sport = :$port" | grep -q .; do sleep 0.01; done
page_kib=$(( $(getconf PAGESIZE) / 1024 ))
rss() { awk -v k="$page_kib" '{print $2 * k}' "/proc/$pid/statm"; }
echo "cycle rss_kb (before any connection: $(rss) kB)"
for cycle in $(seq 1 "$cycles"); do
    target/release/chatd-bench --addr "127.0.0.1:$port" --clients "$clients" >/dev/null 2>&1 \
        || echo "cycle $cycle: chatd-bench reported a failure" >&2
    # Wait until the server has closed every connection.
    while [ "$(ls /proc/$pid/fd | wc -l)" -gt 16 ]; do sleep 0.05; done
    echo "$cycle $(rss)"
done
