"""Benchmarks in the manner of llama-bench: prefill (pp) and decode (tg) tokens/s with spread.

    info = model_info("model.gguf")                 # size, parameters, file type, bytes read per token
    rows = run_bench("model.gguf", threads=[1, 2], n_prompt=512, n_gen=128, reps=5)
    print(to_markdown(rows))

Method (the same as llama-bench's, through the public `infer.LLM` engine):
  * one context per thread count (`LLM(n_threads=t)`), random token ids from a fixed seed;
  * a warm-up run of each test first (JIT cache load, page faults of the mmap), not counted;
  * pp test: fresh KV cache, `engine.prefill(p tokens)` (chunks of n_batch), then the first token
    picked (argmax): tokens/s = p / prefill time; TTFT = prefill + pick;
  * tg test: fresh KV cache, n single-token `engine.decode` calls from position 0 (no sampling):
    tokens/s = n / time;
  * decode GB/s = bytes of weights read per token x tg tokens/s, where a token reads every tensor
    but the token-embedding table (only one row of it is gathered) unless that table is also the
    output head (tied). KV-cache reads are not counted.
  * peak RSS: the process's high-water mark (getrusage) after the measurements at that thread count.
`measure_read_bandwidth` gives the machine's read bandwidth (a Numba parallel sum over a large array)
to put decode GB/s in proportion.
"""
from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .errors import InferError
from .gguf_file import StringArray

log = logging.getLogger("infer.bench")

_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    name: str
    arch: str
    file_size: int            # bytes of the GGUF file
    n_params: int             # elements of all tensors
    file_type: str            # general.file_type (e.g. Q8_0), else the commonest tensor type
    weight_bytes: int         # bytes of all tensors
    bytes_per_token: int      # bytes of weights one decoded token reads
    tied: bool                # output head is the token-embedding table
    n_vocab: int
    n_layers: int

    @property
    def label(self) -> str:
        return f"{self.arch} {_size_label(self.n_params)} {self.file_type}"


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def model_info(path) -> ModelInfo:
    """What a GGUF file holds, from its header alone (nothing is read but the metadata)."""
    from collections import Counter

    from .gguf_file import GGUFFile
    with GGUFFile(path) as gf:
        md = gf.metadata
        arch = md.get("general.architecture", "?")
        tensors = gf.tensors
        total = sum(t.nbytes for t in tensors.values())
        tied = "output.weight" not in tensors
        embd = tensors.get("token_embd.weight")
        per_token = total - (embd.nbytes if (embd is not None and not tied) else 0)
        ft = md.get("general.file_type")
        if isinstance(ft, int) and ft in _FILE_TYPES:
            ftype = _FILE_TYPES[ft]
        else:
            counts = Counter(t.qtype.name for t in tensors.values() if len(t.shape) > 1)
            ftype = counts.most_common(1)[0][0] if counts else "?"
        toks = md.get("tokenizer.ggml.tokens")
        n_vocab = md.get(f"{arch}.vocab_size", len(toks) if isinstance(toks, (list, StringArray)) else 0)
        name = md.get("general.name", "")
        return ModelInfo(path=os.fspath(path), name=name if isinstance(name, str) else "", arch=arch,
                         file_size=gf.size, n_params=sum(t.n_elements for t in tensors.values()),
                         file_type=ftype, weight_bytes=total, bytes_per_token=per_token, tied=tied,
                         n_vocab=int(n_vocab), n_layers=int(md.get(f"{arch}.block_count", 0)))


def max_threads() -> int:
    import numba
    return int(numba.config.NUMBA_NUM_THREADS)


def threading_layer() -> str:
    """Numba's threading layer (known only after a parallel kernel has run), else "unknown"."""
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return "unknown"


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(n: int, engine=None) -> None:
    """Numba's threads, and BLAS's: n, or what the engine's prefill wants (one thread when its
    matmuls run in Numba, see llama.Scratch.blas_threads)."""
    import numba
    numba.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n if engine is None else engine.scratch.blas_threads, user_api="blas")
    except ImportError:  # pragma: no cover - a declared dependency
        pass


def check_threads(threads) -> list[int]:
    threads = [int(t) for t in threads]
    if not threads or any(t < 1 for t in threads):
        raise InferError(f"thread counts must be positive integers (got {threads})")
    mx = max_threads()
    too_many = [t for t in threads if t > mx]
    if too_many:
        raise InferError(f"{max(too_many)} threads requested but Numba allows at most {mx} here "
                         f"(NUMBA_NUM_THREADS / CPU affinity)")
    return threads


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs) if xs else 0.0,
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "samples": list(xs)}


def time_prefill(engine, toks: list[int]) -> tuple[float, float]:
    """(prefill seconds, time to first token seconds) of `toks` in a fresh context."""
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(toks, reuse=False)
    t1 = time.perf_counter()
    int(np.argmax(logits))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def time_decode(engine, toks: list[int]) -> float:
    """Seconds for len(toks) single-token decode steps from position 0 of a fresh context."""
    engine.reset()
    decode = engine.decode
    t0 = time.perf_counter()
    for t in toks:
        decode(t)
    return time.perf_counter() - t0


def run_bench(path, threads=(1,), n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
              n_batch: int = 512, seed: int = 0, warmup: bool = True, progress=None) -> list[dict]:
    """One record per (thread count, test) in llama-bench's JSON shape plus infer's extras
    (ttft, peak RSS, decode GB/s, threading layer). `progress(str)` is told what runs."""
    from . import __version__
    from .api import LLM
    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise InferError(f"nothing to measure: -p {n_prompt} -n {n_gen} (give a positive prompt or generation length)")
    if reps < 1:
        raise InferError(f"repetitions must be at least 1 (got {reps})")
    if n_batch < 1:
        raise InferError(f"batch size must be positive (got {n_batch})")
    threads = check_threads(threads)
    info = model_info(path)
    say = progress or (lambda s: None)
    rng = np.random.default_rng(seed)
    n_ctx = max(n_prompt, n_gen) + 1
    toks = [int(t) for t in rng.integers(0, info.n_vocab, size=max(n_prompt, n_gen))]
    rows = []
    for t in threads:
        gc.collect()                  # the previous context's map and buffers go before the next loads
        llm = LLM(path, n_ctx=n_ctx, n_threads=t, n_batch=min(n_batch, n_ctx))
        try:
            rows += _measure(llm.engine, info, t, toks, n_prompt, n_gen, reps, n_batch, warmup, say)
        finally:
            llm.close()
            del llm
    for r in rows:
        r["infer_version"] = __version__
    return rows


def _measure(e, info, t, toks, n_prompt, n_gen, reps, n_batch, warmup, say) -> list[dict]:
    set_threads(t, e)
    rows = []
    if n_prompt:
        if warmup:
            say(f"{info.label}, {t} threads: pp{n_prompt} warm-up")
            time_prefill(e, toks[:n_prompt])
        pp, ttft = [], []
        for i in range(reps):
            say(f"{info.label}, {t} threads: pp{n_prompt} run {i + 1}/{reps}")
            s, f = time_prefill(e, toks[:n_prompt])
            pp.append(n_prompt / s)
            ttft.append(f)
        rows.append(_record(info, t, n_prompt, 0, pp, n_batch, ttft=ttft))
    if n_gen:
        if warmup:
            say(f"{info.label}, {t} threads: tg{n_gen} warm-up")
            time_decode(e, toks[:min(n_gen, 16)])
        tg = []
        for i in range(reps):
            say(f"{info.label}, {t} threads: tg{n_gen} run {i + 1}/{reps}")
            tg.append(n_gen / time_decode(e, toks[:n_gen]))
        rows.append(_record(info, t, 0, n_gen, tg, n_batch))
    layer, rss = threading_layer(), peak_rss_bytes()
    for r in rows:
        r["threading_layer"] = layer
        r["peak_rss_bytes"] = rss
    return rows


def _record(info: ModelInfo, t, n_prompt, n_gen, tps, n_batch, ttft=None) -> dict:
    s = _stats(tps)
    r = {
        "model_filename": info.path, "model_name": info.name, "model_type": info.label,
        "model_size": info.file_size, "model_n_params": info.n_params, "file_type": info.file_type,
        "n_batch": n_batch, "n_threads": t, "n_prompt": n_prompt, "n_gen": n_gen,
        "test": f"pp{n_prompt}" if n_prompt else f"tg{n_gen}",
        "avg_ts": s["mean"], "stddev_ts": s["stdev"], "samples_ts": s["samples"],
        "cpu_info": cpu_name(), "numba_version": _numba_version(),
    }
    if ttft is not None:
        st = _stats([x * 1000 for x in ttft])
        r.update(ttft_ms=st["mean"], ttft_stddev_ms=st["stdev"])
    if n_gen:
        r["weight_bytes_per_token"] = info.bytes_per_token
        r["decode_gbps"] = info.bytes_per_token * s["mean"] / 1e9
    return r


def _numba_version() -> str:
    import numba
    return numba.__version__


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- formatting -----------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def to_markdown(rows: list[dict], bandwidth: dict | None = None) -> str:
    """llama-bench's table plus TTFT, decode GB/s (and % of `bandwidth` {threads: GB/s}) and peak RSS."""
    head = ["model", "size", "params", "threads", "test", "t/s", "TTFT ms", "GB/s", "peak RSS"]
    if bandwidth:
        head.insert(8, "% of read BW")
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if h not in ("model", "test") else "---" for h in head) + "|"]
    for r in rows:
        ttft = f"{r['ttft_ms']:.1f} ± {r['ttft_stddev_ms']:.1f}" if "ttft_ms" in r else ""
        gbps = f"{r['decode_gbps']:.2f}" if "decode_gbps" in r else ""
        cells = [r["model_type"], _gib(r["model_size"]), f"{r['model_n_params'] / 1e9:.2f} B" if r["model_n_params"] >= 1e8
                 else f"{r['model_n_params'] / 1e6:.1f} M", str(r["n_threads"]), r["test"],
                 f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}", ttft, gbps,
                 f"{r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB"]
        if bandwidth:
            bw = bandwidth.get(r["n_threads"])
            cells.insert(8, f"{100 * r['decode_gbps'] / bw:.0f}%" if (bw and "decode_gbps" in r) else "")
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        layers = sorted({r.get("threading_layer", "unknown") for r in rows})
        lines.append("")
        lines.append(f"infer {rows[0].get('infer_version', '?')}, numba {rows[0]['numba_version']} "
                     f"(threading layer: {', '.join(layers)}), CPU: {rows[0]['cpu_info']}")
        if bandwidth:
            lines.append("read bandwidth: " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw:.1f} GB/s"
                                                         for t, bw in sorted(bandwidth.items())))
    return "\n".join(lines)


# --- memory read bandwidth ------------------------------------------------------------------------
_sum_kernel = None


def _kernel():
    global _sum_kernel
    if _sum_kernel is None:
        from numba import njit, prange

        @njit(fastmath=True, cache=True)
        def _sum(a):  # a: (n,) f32; a plain loop LLVM vectorizes (a prange body would not be)
            s0 = np.float32(0.0)
            for i in range(a.shape[0]):
                s0 += a[i]
            return s0

        @njit(parallel=True, fastmath=True, cache=True)
        def chunked_sum(a, n_chunks, out):  # a: (n,) f32; out: (n_chunks,) f32
            n = a.shape[0]
            step = (n + n_chunks - 1) // n_chunks
            for c in prange(n_chunks):
                out[c] = _sum(a[c * step:min(n, (c + 1) * step)])
        _sum_kernel = chunked_sum
    return _sum_kernel


def measure_read_bandwidth(threads=(1,), size_mb: int = 1024, repeats: int = 5) -> dict:
    """{threads: best GB/s} reading a size_mb float32 array (much larger than the caches) with a
    Numba parallel sum split into equal chunks, one per thread; best of `repeats` passes. Also
    numpy's single-thread `a.sum()` as "numpy"."""
    import numba
    threads = check_threads(threads)
    a = np.ones(size_mb * 2**20 // 4, np.float32)      # touched: pages resident before timing
    k = _kernel()
    out = {}
    saved = numba.get_num_threads()
    try:
        for t in threads:
            numba.set_num_threads(t)
            part = np.zeros(t * 8, np.float32)
            k(a[:1024], t * 8, part)
            best = 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                k(a, t * 8, part)
                dt = time.perf_counter() - t0
                best = max(best, a.nbytes / dt / 1e9)
            out[t] = best
        best = 0.0
        for _ in range(max(1, repeats // 2)):
            t0 = time.perf_counter()
            a.sum()
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
        out["numpy"] = best
    finally:
        numba.set_num_threads(saved)
    return out


def system_info() -> dict:
    import numba
    try:
        aff = len(os.sched_getaffinity(0))
    except AttributeError:
        aff = os.cpu_count() or 1
    return {"cpu": cpu_name(), "cpus_available": aff, "numba": numba.__version__,
            "numba_max_threads": int(numba.config.NUMBA_NUM_THREADS), "numpy": np.__version__,
            "python": platform.python_version()}


__all__ = ["ModelInfo", "model_info", "run_bench", "to_markdown", "measure_read_bandwidth",
           "threading_layer", "peak_rss_bytes", "system_info"]
