"""Median round trip of a 1 KiB echo call from Python.

    python bench_latency.py SOCKET [CALLS]
"""

import statistics
import sys
import time

import meshshm


def main() -> None:
    sock = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    body = b"x" * 1024
    with meshshm.Client(sock) as c:
        for _ in range(calls // 10):
            c.call("echo", "Echo", body)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            c.call("echo", "Echo", body)
            times.append((time.perf_counter_ns() - t0) / 1000)
    times.sort()
    print(f"python: {calls} calls of 1024 B: median {statistics.median(times):.1f} us, "
          f"p99 {times[calls * 99 // 100]:.1f} us")


if __name__ == "__main__":
    main()
