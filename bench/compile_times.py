"""Where a first run's compile time goes: every Numba kernel compiled by a command, with its own
compile time (Numba's compiler_lock timer, callees included, and of it the llvm_lock one) and the number of signatures.

    NUMBA_CACHE_DIR=$(mktemp -d) python bench/compile_times.py generate MODEL -p "..." -n 1
    INFER_WARMUP_CHILD=1 ...   (everything in this one process: no second compiler process)

Runs `infer ARGS...` in this process, then lists the kernels slowest first (stderr)."""
from __future__ import annotations

import gc
import sys
import time


def main() -> int:
    from numba.core.registry import CPUDispatcher
    sys.argv = ["infer"] + sys.argv[1:]
    from infer.cli.main import main as cli
    t0 = time.perf_counter()
    try:
        cli()
    except SystemExit:
        pass
    total = time.perf_counter() - t0
    rows = []
    for d in gc.get_objects():
        if isinstance(d, CPUDispatcher):
            for sig in d.signatures:
                timers = d.get_metadata(sig).get("timers", {}) if d.overloads[sig].metadata else {}
                t = timers.get("compiler_lock", 0.0)
                rows.append((t, timers.get("llvm_lock", 0.0), f"{d.py_func.__module__}.{d.py_func.__qualname__}",
                             str(sig)[:80]))
    rows.sort(reverse=True)
    print(f"\n{total:.2f} s in the command; compiled here (s, callees included):", file=sys.stderr)
    print("  total   llvm  kernel  signature", file=sys.stderr)
    for t, llvm, name, sig in rows:
        if t > 0.05:
            print(f"{t:7.2f} {llvm:6.2f}  {name}  {sig}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
