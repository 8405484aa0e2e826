#!/usr/bin/env python3
"""Samples a running cluster once a second for benches/million.sh.

    million_sample.py OUT REDIS_PORT REDIS_PID

Appends one line a second to OUT/samples.txt: time, the nodes' CPU ticks
and PSS in kB (the pids in OUT/node*.pid), the generator's RSS in kB
(every process named chatd-bench), Redis's CPU ticks, commands processed
and used_memory, Slab and MemAvailable in kB, the keys in Redis, the
generator's CPU ticks, the CPU ticks the whole machine was busy
(/proc/stat: what is not ours is the rest less these), and the kB of
slab in /proc inodes (`proc_inode_cache`: a process listing others'
descriptors leaves one per descriptor; 0 if /proc/slabinfo is not
readable). One
process that forks nothing: on a machine busy with a million connections,
a shell loop spawning a hundred awk processes a sample fell minutes behind.
Whatever cannot be read (a process gone, Redis slow) counts as 0.
"""
import glob
import os
import socket
import sys
import time


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def ticks(pid):
    stat = read(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[11]) + int(fields[12]) if len(fields) > 12 else 0


def busy():
    """Ticks all CPUs spent on anything but idling or waiting for I/O."""
    fields = read("/proc/stat").split("\n", 1)[0].split()[1:]
    if len(fields) < 7:
        return 0
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return user + nice + system + irq + softirq


def proc_inodes_kb():
    """kB of slab in `proc_inode_cache` (objects times object size)."""
    for line in read("/proc/slabinfo").splitlines():
        if line.startswith("proc_inode_cache "):
            fields = line.split()
            return int(fields[2]) * int(fields[3]) // 1024
    return 0


def kb(text, key):
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def redis(port):
    """INFO's total_commands_processed and used_memory, and DBSIZE."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"INFO all\r\nDBSIZE\r\n")
            data = b""
            while True:
                # A bulk string ($len, the text), then an integer (:n).
                head = data.find(b"\r\n")
                if head > 0:
                    size = int(data[1:head])
                    rest = data[head + 2 + size + 2:]
                    if rest.startswith(b":") and rest.endswith(b"\r\n"):
                        break
                chunk = s.recv(65536)
                if not chunk:
                    return 0, 0, 0
                data += chunk
    except (OSError, ValueError):
        return 0, 0, 0
    info = data[head + 2:head + 2 + size].decode(errors="replace")
    stats = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    number = lambda key: int(stats.get(key, "0").strip() or 0)
    return number("total_commands_processed"), number("used_memory"), int(rest[1:-2])


def main():
    out, port, redis_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    once = len(sys.argv) > 4
    with open(f"{out}/samples.txt", "a") as f:
        while True:
            started = time.time()
            node_ticks = node_pss = 0
            for file in glob.glob(f"{out}/node*.pid"):
                pid = read(file).strip()
                if pid.isdigit():
                    node_ticks += ticks(pid)
                    node_pss += kb(read(f"/proc/{pid}/smaps_rollup"), "Pss:")
            gen = gen_ticks = 0
            for comm in glob.glob("/proc/[0-9]*/comm"):
                if read(comm).strip() == "chatd-bench":
                    gen += kb(read(comm[: -len("comm")] + "status"), "VmRSS:")
                    gen_ticks += ticks(comm.split("/")[2])
            commands, used, keys = redis(port)
            meminfo = read("/proc/meminfo")
            f.write(f"{started:.6f} {node_ticks} {node_pss} {gen} {ticks(redis_pid)} {commands} "
                    f"{used} {kb(meminfo, 'Slab:')} {kb(meminfo, 'MemAvailable:')} {keys} "
                    f"{gen_ticks} {busy()} {proc_inodes_kb()}\n")
            f.flush()
            if once:
                return
            time.sleep(max(0.0, 1 - (time.time() - started)))


if __name__ == "__main__":
    main()
