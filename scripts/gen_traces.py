#!/usr/bin/env python3
"""Generate the simulator's benchmark traces in benches/traces/ (deterministic, stdlib only).

Usage: python3 scripts/gen_traces.py [OUTPUT_DIR]   (default: benches/traces next to this repo)

Every trace has one row per minute (time_s = 0, 60, 120, ...). `arriving_jobs` is the number of
jobs arriving during that minute; `p95_s`, where present, is the service-time p95 in seconds
(latency without queueing). Re-running the script rewrites identical files: each trace draws its
noise from its own random.Random with a fixed seed.
"""

import math
import os
import random
import sys

SEED = 20240611


def rng_for(name):
    """A generator per trace, so changing one trace leaves the others byte-identical."""
    return random.Random(f"{SEED}:{name}")


def jobs(rate, rng, noise):
    """Rounds a per-minute rate with small multiplicative noise to a whole, non-negative count."""
    return max(0, round(rate * (1.0 + rng.gauss(0.0, noise))))


def steady_diurnal():
    """24 h: a smooth day curve between ~4 and ~40 jobs/min (low at 04:00, high at 16:00)."""
    rng = rng_for("steady_diurnal")
    rows = []
    for minute in range(24 * 60):
        hours = minute / 60.0
        day = 0.5 - 0.5 * math.cos(2.0 * math.pi * (hours - 4.0) / 24.0)  # 0 at 04:00, 1 at 16:00
        rate = 4.0 + 36.0 * day
        p95 = 10.0 + 1.2 * math.sin(2.0 * math.pi * hours / 6.0) + rng.gauss(0.0, 0.3)
        p95 = min(12.0, max(8.0, p95))
        rows.append((minute * 60, jobs(rate, rng, 0.05), f"{p95:.2f}"))
    return ["time_s", "arriving_jobs", "p95_s"], rows


def bursty():
    """6 h: ~6 jobs/min with 8 non-overlapping bursts of 60-150 jobs/min lasting 3-15 min."""
    rng = rng_for("bursty")
    minutes = 6 * 60
    rate = [6.0] * minutes
    bursts = []
    while len(bursts) < 8:
        length = rng.randint(3, 15)
        start = rng.randint(10, minutes - 30)
        # Keep at least 10 quiet minutes between bursts so each one is a separate event.
        if any(start < e + 10 and s < start + length + 10 for s, e in bursts):
            continue
        bursts.append((start, start + length))
        peak = rng.uniform(60.0, 150.0)
        for m in range(start, start + length):
            rate[m] = peak
    rows = [(m * 60, jobs(rate[m], rng, 0.08)) for m in range(minutes)]
    return ["time_s", "arriving_jobs"], rows


def single_spike():
    """3 h: ~5 jobs/min with one 20-minute spike of ~200 jobs/min starting at minute 60."""
    rng = rng_for("single_spike")
    rows = []
    for minute in range(3 * 60):
        rate = 200.0 if 60 <= minute < 80 else 5.0
        rows.append((minute * 60, jobs(rate, rng, 0.05)))
    return ["time_s", "arriving_jobs"], rows


def write(path, header, rows):
    with open(path, "w", newline="\n", encoding="ascii") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "benches", "traces")
    os.makedirs(out, exist_ok=True)
    for name, make in [
        ("steady_diurnal", steady_diurnal),
        ("bursty", bursty),
        ("single_spike", single_spike),
    ]:
        header, rows = make()
        path = os.path.join(out, f"{name}.csv")
        write(path, header, rows)
        print(f"wrote {os.path.normpath(path)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
