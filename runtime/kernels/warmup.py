"""First run: the kernels compile once per CPU target, in two processes at once.

With an empty kernel cache, Numba compiles every kernel on first use: 15-20 s on two cores, all in
the process that wants its first token. `LLM` starts this module as a second process
(`python -m infer.kernels.warmup MODEL ...`) that compiles the decode step (one token through
the model: the fused decode_step, the matvec drivers, decode attention; and the float matvec of the
prompt's logits) and writes it to the cache, while the first process compiles the prompt's
kernels. The prompt's logits come from numpy while the second process still runs; the first
decode step waits for it and then loads what it wrote. On two cores the first token comes after
the prompt's half of the work. A run that ends before its first decode step (`generate -n 1`)
waits for the second process when it closes, so the cache is whole for the next one.

`is_cold()` says whether this CPU target's kernels are still to be compiled (a marker file in the
cache, written by `mark_warm()` once both halves are compiled), so the CLI can say so at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger("infer")

CHILD = "INFER_WARMUP_CHILD"     # set in the second process's environment

# seconds a first run spends compiling (SmolLM2, two processes on 2 cores of a Zen 4 EPYC)
ESTIMATE_S = 10


def _marker() -> str | None:
    d = os.environ.get("NUMBA_CACHE_DIR")
    if not d:
        return None
    try:
        from numba.core import config
        import llvmlite.binding as ll
        cpu = config.CPU_NAME or ll.get_host_cpu_name()
        feat = config.CPU_FEATURES if config.CPU_FEATURES is not None else ll.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - numba/llvmlite always answer
        return None
    key = hashlib.sha256(f"{cpu}|{feat}|{sys.version_info[:2]}".encode()).hexdigest()[:16]
    return os.path.join(d, f"compiled-{key}")


def is_cold() -> bool:
    """Whether the kernels have not yet been compiled for this CPU target and package state."""
    m = _marker()
    return m is not None and not os.path.exists(m)


def mark_warm() -> None:
    m = _marker()
    if m is None or os.path.exists(m):
        return
    try:
        os.makedirs(os.path.dirname(m), exist_ok=True)
        with open(m + f".tmp{os.getpid()}", "w") as f:
            f.write(f"{time.time()}\n")
        os.replace(m + f".tmp{os.getpid()}", m)
    except OSError:
        pass


class Background:
    """The decode step compiling in a second process (see the module docstring)."""

    def __init__(self, path: str, n_threads: int, int8_activations: bool):
        args = [sys.executable, "-m", "infer.kernels.warmup", os.fspath(path), str(n_threads),
                "1" if int8_activations else "0"]
        self.t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, env={**os.environ, CHILD: "1"})
        except OSError as e:
            log.warning("infer: cannot start the kernel compiler process (%s); compiling here", e)
            self.proc = None

    def wait(self) -> bool:
        """Until the second process has written its kernels to the cache (or failed: then this
        process compiles them itself, as without it). Whether it succeeded."""
        if self.proc is None:
            return False
        try:
            _, err = self.proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            log.warning("infer: the kernel compiler process timed out; compiling here")
            return False
        finally:
            proc, self.proc = self.proc, None
        if proc.returncode != 0:
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            log.warning("infer: the kernel compiler process failed (%s); compiling here", last[0])
            return False
        log.info("infer: decode kernels compiled in a second process in %.1f s", time.perf_counter() - self.t0)
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.proc = None


def _main(argv) -> int:
    path, n_threads, i8 = argv[0], int(argv[1]), argv[2] == "1"
    import infer
    with infer.LLM(path, n_ctx=64, n_threads=n_threads, int8_activations=i8) as llm:
        e = llm.engine
        e.reset()
        tok = llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None and llm.tokenizer.bos_id >= 0 else 0
        e.decode(int(tok))
        llm.model.compile_logits(e.scratch)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
