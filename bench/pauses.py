#!/usr/bin/env python3
"""How often this machine stops running a busy process, and for how long.

Spins for SECONDS (default 5) reading the clock and records every gap between two readings
longer than 0.5 ms: time the process was not running (hypervisor steal, interrupts, other
tasks, RT throttling). A server cannot answer in under 1 ms at p99 while the machine pauses
like this more often than 1% of its queries' time: dns.sh prints this next to its latencies.

    python3 bench/pauses.py [SECONDS]
"""
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
start = last = time.perf_counter()
gaps = []
while last - start < seconds:
    now = time.perf_counter()
    if now - last > 0.0005:
        gaps.append(now - last)
    last = now
gaps.sort()
lost = sum(gaps)
print(
    f"{len(gaps)} pauses over 0.5 ms in {seconds:g} s ({100 * lost / seconds:.1f}% of the time), "
    f"longest {1000 * gaps[-1] if gaps else 0:.1f} ms, "
    f"median {1000 * gaps[len(gaps) // 2] if gaps else 0:.1f} ms"
)
