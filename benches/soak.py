#!/usr/bin/env python3
"""Soak test: run chatd for a bounded time under churn and misbehaviour.

    benches/soak.py [--minutes 10] [--churners 8]

Traffic goes to 127.0.0.1 only, and everything stops by itself. The
release build of chatd and chatd-bench is made first. Then:

- chatd-bench keeps 200 clients connected for the whole run, 50 of them
  sending to 3 others each (closed loop): they must lose nothing and see
  nothing unexpected (chatd-bench's own verdict);
- churner threads connect and disconnect all the time, each round one of:
  a short chat, a reset in the middle of a line, a half-close with a
  partial last line, random bytes, a too-long line, an invalid or taken
  name, a silent connection (closed by --login-timeout), a recipient that
  never reads while others send to it (closed as a slow consumer);
- the server's RSS and open descriptors are sampled every 10 s.

At the end, every connection must be gone (descriptors back to what they
were before the first client) and the RSS must not grow over the run (the
last sample after the warm-up is compared with the peak of the first
half, after a warm-up of a minute or 30 % of a short run). Prints the samples and a verdict; exits 1 on failure.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(port, small_receive_buffer=False):
    s = socket.socket()
    if small_receive_buffer:
        # No autotuning to megabytes: what it does not read waits in chatd.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def drain(s, seconds=3.0):
    """Reads until the server closes or `seconds` pass."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def reset(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


class Churner(threading.Thread):
    def __init__(self, port, ident, stop, counts):
        super().__init__(daemon=True)
        self.port, self.number, self.stop, self.counts = port, ident, stop, counts
        self.rng = random.Random(ident)

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"churn{self.number}x{n}"
            kind = self.rng.choice(
                ["chat", "chat", "chat", "reset", "halfclose", "garbage",
                 "toolong", "badname", "taken", "silent", "slow"])
            try:
                getattr(self, kind)(name)
                self.counts[kind] = self.counts.get(kind, 0) + 1
            except OSError as e:
                key = f"{kind}: {type(e).__name__}"
                self.counts[key] = self.counts.get(key, 0) + 1
            time.sleep(self.rng.random() * 0.05)

    def chat(self, name):
        lines = [f"{name}\n"] + [f"{name}, nobody{i}: hello {i}\n"
                                 for i in range(self.rng.randint(1, 20))]
        self.send_and_halfclose("".join(lines).encode())

    def reset(self, name):
        s = connect(self.port)
        s.sendall(f"{name}\n{name}: this line is cut".encode())
        reset(s)

    def halfclose(self, name):
        self.send_and_halfclose(f"{name}\n{name}: partial last line".encode())

    def garbage(self, name):
        noise = bytes(self.rng.getrandbits(8) for _ in range(4000))
        self.send_and_halfclose(f"{name}\n".encode() + noise)

    def send_and_halfclose(self, data):
        """Sends `data`, half-closes, and reads until the server closes."""
        s = connect(self.port)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        drain(s)
        s.close()

    def toolong(self, name):
        s = connect(self.port)
        s.sendall(f"{name}\n{name}: ".encode() + b"x" * 20000)
        drain(s)
        s.close()

    def badname(self, name):
        s = connect(self.port)
        s.sendall(b"not a name\n")
        drain(s)
        s.close()

    def taken(self, name):
        s = connect(self.port)
        s.sendall(b"b1\nb2: I am not b1\n")  # a name the benchmark holds
        drain(s)
        s.close()

    def silent(self, name):
        s = connect(self.port)
        drain(s, seconds=4)  # --login-timeout 2 closes it
        s.close()

    def slow(self, name):
        victim = connect(self.port, small_receive_buffer=True)
        victim.sendall(f"{name}\n{name}: ready\n".encode())
        victim.settimeout(5)
        victim.recv(100)
        sender = connect(self.port)
        sender.sendall(f"{name}s\n".encode())
        line = f"{name}: {'s' * 1000}\n".encode()
        try:
            # 6 MB to a reader that never reads: more than the kernel's
            # socket buffers take (4 MB), so the rest waits in chatd.
            for _ in range(6000):
                sender.sendall(line)
        except OSError:
            pass
        sender.shutdown(socket.SHUT_WR)
        drain(sender)
        sender.close()
        drain(victim)
        victim.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--churners", type=int, default=8)
    ap.add_argument("--max-outbound", type=int, default=262144,
                    help="chatd's --max-outbound (a larger one lets the slow consumers "
                         "reach --max-buffer-memory first)")
    ap.add_argument("--max-buffer-memory", type=int, default=1 << 20,
                    help="chatd's bound on all buffers together: tight by default, so that "
                         "the slow consumers reach it and the bound is exercised")
    args = ap.parse_args()
    seconds = args.minutes * 60

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "chatd",
                    "--bin", "chatd-bench"], cwd=ROOT, check=True)
    port = free_port()
    server = subprocess.Popen(
        [f"{ROOT}/target/release/chatd", "--addr", f"127.0.0.1:{port}",
         "--login-timeout", "2", "--max-outbound", str(args.max_outbound), "--log-level", "warn",
         "--max-buffer-memory", str(args.max_buffer_memory)],
        stderr=open(f"{ROOT}/target/soak-chatd.log", "w"))
    try:
        for _ in range(500):
            if subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                              text=True).stdout.strip():
                break
            time.sleep(0.01)
        fds_idle = fds(server.pid)
        bench = subprocess.Popen(
            [f"{ROOT}/target/release/chatd-bench", "--addr", f"127.0.0.1:{port}",
             "--clients", "200", "--senders", "50", "--fanout", "3", "--window", "4",
             "--duration", str(seconds), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stop = threading.Event()
        counts = {}
        churners = [Churner(port, i, stop, counts) for i in range(args.churners)]
        for c in churners:
            c.start()
        samples = []
        start = time.time()
        while bench.poll() is None:
            samples.append((round(time.time() - start), rss_kb(server.pid), fds(server.pid)))
            print(f"t={samples[-1][0]:>4}s rss={samples[-1][1]} kB fds={samples[-1][2]}", flush=True)
            time.sleep(10)
        stop.set()
        for c in churners:
            c.join(timeout=30)
        result = json.loads(bench.stdout.read())
        # Every connection must go: descriptors back to the idle count.
        deadline = time.time() + 30
        while fds(server.pid) > fds_idle and time.time() < deadline:
            time.sleep(0.1)
        fds_end, rss_end = fds(server.pid), rss_kb(server.pid)
        server.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        warm_up = min(60, seconds * 0.3)  # connects and first bursts
        warm = [s for s in samples if s[0] >= warm_up] or samples
        half = warm[: max(1, len(warm) // 2)]
        peak_first_half = max(s[1] for s in half)
        last = warm[-1][1]
        ok_bench = result.get("result") == "ok"
        ok_fds = fds_end == fds_idle
        ok_rss = last <= peak_first_half * 1.05
        print(f"\nminutes: {args.minutes}, churners: {args.churners}")
        print("churn rounds:", json.dumps(counts, sort_keys=True))
        print(f"bench: lines_sent={result.get('lines_sent')} deliveries={result.get('deliveries')} "
              f"lost={result.get('lost')} unexpected={result.get('unexpected')} "
              f"error_lines='{result.get('error_lines')}' closed_by_server={result.get('closed_by_server')} "
              f"-> {'ok' if ok_bench else 'FAILED'}")
        print(f"descriptors: idle {fds_idle}, at the end {fds_end} -> {'ok' if ok_fds else 'FAILED'}")
        print(f"rss: peak of the first half after {warm_up:.0f} s {peak_first_half} kB, last sample {last} kB, "
              f"after everyone left {rss_end} kB -> {'ok' if ok_rss else 'FAILED'}")
        # chatd logs at warn here: count its slow-consumer warnings.
        with open(f"{ROOT}/target/soak-chatd.log") as log:
            text = log.read()
        at_outbound = text.count("closing slow consumer")
        at_memory = text.count("buffers reached --max-buffer-memory")
        print(f"server: --max-buffer-memory {args.max_buffer_memory}, closed as slow "
              f"consumers: {at_outbound} at --max-outbound, {at_memory} at --max-buffer-memory")
        ok = ok_bench and ok_fds and ok_rss
        print("soak:", "ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
