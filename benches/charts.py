#!/usr/bin/env python3
"""Draws SVG charts from a run of benches/compare.sh.

    pip install -r benches/requirements-charts.txt   # matplotlib
    benches/compare.sh BASELINE_BINARY               # results in target/compare/
    python3 benches/charts.py                        # charts in docs/charts/

Reads <scenario>.<server>.json and <scenario>.<server>.hgrm (server: chatd
or baseline) from the results directory, and writes:

  latency-<scenario>.svg   delivery latency by percentile, chatd against the
                           baseline, from the .hgrm files (HdrHistogram's
                           percentile distribution, values in microseconds),
                           for the open-loop (rate100k) and scale (scale19k)
                           scenarios, and any other given with --latency
  cpu-per-delivery.svg     server CPU microseconds per delivery, as bars, for
                           each traffic scenario run
  memory-per-connection.svg  server resident bytes per idle connection, as
                           bars (idle10k, and scale19k's connect phase)

A scenario that was not run (no file) is left out of its chart. The SVGs
carry no date and fixed element ids, so a rerun on the same results writes
the same files.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402

SERVERS = [("chatd", "chatd", "#1f77b4"), ("baseline", "baseline (tokio)", "#ff7f0e")]
TRAFFIC = ["fanout1", "fanout10", "rate100k", "scale19k"]
MEMORY = ["idle10k", "scale19k"]


def load_json(results, scenario, server):
    try:
        with open(os.path.join(results, f"{scenario}.{server}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_hgrm(path):
    """(percentile, value) rows of an .hgrm file, and its max."""
    rows, top = [], None
    with open(path) as f:
        for line in f:
            cols = line.split()
            if not cols or line.startswith("#") or cols[0] == "Value":
                continue
            value, percentile = float(cols[0]), float(cols[1])
            top = value
            rows.append((percentile, value))
    return rows, top


def latency_chart(results, scenario, out):
    plt.figure(figsize=(8, 4.8))
    drawn = False
    for server, label, color in SERVERS:
        path = os.path.join(results, f"{scenario}.{server}.hgrm")
        if not os.path.exists(path):
            continue
        rows, top = load_hgrm(path)
        # x = 1/(1-p) on a log axis, as HdrHistogram's own plotter: each
        # decade is one more nine. The 100th percentile is the max, noted in
        # the legend.
        points = [(1 / (1 - p), v) for p, v in rows if p < 1]
        if not points:
            continue
        xs, ys = zip(*points)
        plt.step(xs, ys, where="post", color=color, label=f"{label} (max {top:,.0f} µs)")
        drawn = True
    if not drawn:
        plt.close()
        return None
    ax = plt.gca()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 10, 100, 1000, 10000, 100000, 1000000]
    names = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    xmax = ax.get_xlim()[1]
    shown = [(t, n) for t, n in zip(ticks, names) if t <= xmax * 1.01]
    ax.xaxis.set_major_locator(FixedLocator([t for t, _ in shown]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: dict(shown).get(round(x), "")))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    # Plain numbers on the latency axis, at 1, 2 and 5 of each decade (a
    # run may span less than one decade).
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda y, _: f"{y:,.0f}" if f"{y:.0e}"[0] in "25" else "")
    )
    ax.set_xlabel("percentile")
    ax.set_ylabel("delivery latency (µs, log scale)")
    chatd = load_json(results, scenario, "chatd") or {}
    ax.set_title(f"{scenario}: delivery latency by percentile\n{describe(scenario, chatd)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left")
    return save(out, f"latency-{scenario}.svg")


def describe(scenario, result):
    """One line on what the scenario did, from its JSON result."""
    parts = []
    if "clients" in result:
        parts.append(f"{result['clients']:,} clients")
    if "senders" in result:
        parts.append(f"{result['senders']:,} senders, fanout {result.get('fanout', 1)}")
    if "rate" in result:
        parts.append(f"open loop {result['rate']:,.0f} lines/s")
    elif "window" in result:
        parts.append(f"closed loop, window {result['window']}")
    return ", ".join(parts)


def bar_chart(results, scenarios, key, scale, ylabel, title, name, out, fmt):
    found = [s for s in scenarios if any(load_json(results, s, srv) for srv, _, _ in SERVERS)]
    if not found:
        return None
    plt.figure(figsize=(8, 4.5))
    width = 0.38
    for n, (server, label, color) in enumerate(SERVERS):
        xs, ys = [], []
        for i, s in enumerate(found):
            value = (load_json(results, s, server) or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(i + (n - 0.5) * width)
                ys.append(value * scale)
        bars = plt.bar(xs, ys, width, color=color, label=label)
        plt.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8, padding=2)
    plt.xticks(range(len(found)), found)
    plt.ylabel(ylabel)
    plt.title(title, fontsize=10)
    plt.legend()
    plt.margins(y=0.15)
    plt.grid(True, axis="y", alpha=0.3)
    return save(out, name)


def save(out, name):
    path = os.path.join(out, name)
    plt.tight_layout()
    plt.savefig(path, format="svg", metadata={"Date": None})
    plt.close()
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="target/compare", help="compare.sh's OUT [target/compare]")
    parser.add_argument("--out", default="docs/charts", help="where the SVGs go [docs/charts]")
    parser.add_argument(
        "--latency",
        nargs="*",
        default=["rate100k", "scale19k"],
        help="scenarios to draw latency curves for [rate100k scale19k]",
    )
    args = parser.parse_args()
    # Fixed ids in the SVG, so reruns on the same data give the same files.
    matplotlib.rcParams["svg.hashsalt"] = "chatd-charts"
    os.makedirs(args.out, exist_ok=True)
    written = [latency_chart(args.results, s, args.out) for s in args.latency]
    written.append(
        bar_chart(
            args.results,
            TRAFFIC,
            "server_cpu_us_per_delivery",
            1.0,
            "server CPU per delivery (µs)",
            "Server CPU time per delivery (lower is better)",
            "cpu-per-delivery.svg",
            args.out,
            lambda y: f"{y:.3f}",
        )
    )
    written.append(
        bar_chart(
            args.results,
            MEMORY,
            "server_bytes_per_conn",
            1 / 1024,
            "server RSS per connection (KiB)",
            "Server resident memory per connection (lower is better)",
            "memory-per-connection.svg",
            args.out,
            lambda y: f"{y:.1f}",
        )
    )
    written = [w for w in written if w]
    if not written:
        sys.exit(f"charts.py: no results in {args.results} (run benches/compare.sh first)")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
