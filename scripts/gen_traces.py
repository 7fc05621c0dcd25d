#!/usr/bin/env python3
"""Generate the simulator's benchmark traces in benches/traces/ (deterministic, stdlib only).

Usage: python3 scripts/gen_traces.py [OUTPUT_DIR]   (default: benches/traces next to this repo)

Every trace has one row per minute (time_s = 0, 60, 120, ...), but `weekly`, which has one row
per 5 minutes (a row's jobs arrive spread over its interval). `arriving_jobs` is the number of
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


def weekly():
    """7 days in 5-minute rows: weekday days peaking at ~45 jobs/min (09:00-18:00), nights at
    ~3, a lighter Saturday and Sunday (peaks ~18), with 8% noise."""
    rng = rng_for("weekly")
    rows = []
    step = 5
    for slot in range(7 * 24 * 60 // step):
        minute = slot * step
        day, hours = divmod(minute / 60.0, 24.0)
        peak = 45.0 if day < 5 else 18.0
        # A smooth working-day bump: 0 before 07:00 and after 21:00, 1 between 10:00 and 17:00.
        if hours < 7.0 or hours > 21.0:
            shape = 0.0
        elif hours < 10.0:
            shape = 0.5 - 0.5 * math.cos(math.pi * (hours - 7.0) / 3.0)
        elif hours <= 17.0:
            shape = 1.0
        else:
            shape = 0.5 + 0.5 * math.cos(math.pi * (hours - 17.0) / 4.0)
        rate = 3.0 + (peak - 3.0) * shape
        rows.append((minute * 60, jobs(rate * step, rng, 0.08)))
    return ["time_s", "arriving_jobs"], rows


def flash_crowds():
    """12 h: ~6 jobs/min and 5 flash crowds that jump to 80-180 jobs/min at once and decay
    exponentially (time constant 6-15 min) back to the base."""
    rng = rng_for("flash_crowds")
    minutes = 12 * 60
    rate = [6.0] * minutes
    for _ in range(5):
        start = rng.randint(20, minutes - 90)
        peak = rng.uniform(80.0, 180.0)
        tau = rng.uniform(6.0, 15.0)
        for m in range(start, minutes):
            extra = peak * math.exp(-(m - start) / tau)
            if extra < 0.5:
                break
            rate[m] += extra
    rows = [(m * 60, jobs(rate[m], rng, 0.05)) for m in range(minutes)]
    return ["time_s", "arriving_jobs"], rows


def poisson_heavy_tail():
    """6 h: Poisson arrivals of ~5 single jobs/min plus batches arriving as a Poisson process
    (one per 15 min on average) whose sizes are heavy-tailed (Pareto, alpha 1.3, at least 20
    jobs, capped at 800), each batch landing within one minute."""
    rng = rng_for("poisson_heavy_tail")
    minutes = 6 * 60

    def poisson(lam):
        # Knuth's method: fine for the small rates used here.
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1

    rows = []
    for m in range(minutes):
        n = poisson(5.0)
        for _ in range(poisson(1.0 / 15.0)):
            n += min(800, int(20.0 * rng.paretovariate(1.3)))
        rows.append((m * 60, n))
    return ["time_s", "arriving_jobs"], rows


def slow_ramp():
    """8 h: 4 jobs/min rising linearly to 70 over 6 h, an hour at 70, then an hour back down
    to 4, with 5% noise: capacity must follow a trend, not a burst."""
    rng = rng_for("slow_ramp")
    rows = []
    for m in range(8 * 60):
        if m < 360:
            rate = 4.0 + 66.0 * m / 360.0
        elif m < 420:
            rate = 70.0
        else:
            rate = 70.0 - 66.0 * (m - 420) / 60.0
        rows.append((m * 60, jobs(rate, rng, 0.05)))
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
        ("weekly", weekly),
        ("flash_crowds", flash_crowds),
        ("poisson_heavy_tail", poisson_heavy_tail),
        ("slow_ramp", slow_ramp),
    ]:
        header, rows = make()
        path = os.path.join(out, f"{name}.csv")
        write(path, header, rows)
        print(f"wrote {os.path.normpath(path)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
