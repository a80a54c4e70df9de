"""This machine's memory read bandwidth, the ceiling of decode (which reads every weight per token).

    python bench/membw.py [-t 1,2] [--mb 1024] [--repeats 5] [--json]

A Numba parallel sum over a float32 array much larger than the caches (1 GiB by default), split
into 8 chunks per thread (infer.bench.measure_read_bandwidth); best of --repeats passes per thread
count, plus numpy's single-thread a.sum() for reference. Prints GB/s (1e9 bytes per second).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--mb", type=int, default=1024, help="array size in MiB (default 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="passes per thread count; the best is kept")
    ap.add_argument("--json", action="store_true", help="print a JSON object {threads: GB/s, numpy: GB/s}")
    a = ap.parse_args(argv)
    from infer.bench import measure_read_bandwidth, threading_layer
    from infer.errors import InferError
    try:
        ts = [int(x) for x in a.threads.split(",")]
        bw = measure_read_bandwidth(ts, a.mb, max(1, a.repeats))
    except (ValueError, InferError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({**{str(k): v for k, v in bw.items()}, "threading_layer": threading_layer()}))
    else:
        for k, v in bw.items():
            what = f"{k} thread{'s' if k != 1 else ''}" if isinstance(k, int) else "numpy a.sum() (1 thread)"
            print(f"read bandwidth, {what}: {v:.1f} GB/s")
        print(f"(Numba threading layer: {threading_layer()}; {a.mb} MiB float32 array, best of {a.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
