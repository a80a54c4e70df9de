"""One kernel alone, on random blocks of a format: the prompt matmul (G int8 multiply-adds/s) and the
decode matvec (GB/s of weights, M blocks of 256 values/s), with the kernels this process compiles
for its CPU (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES pick another target: e.g. the host's feature string
with +avx512vnni turned into -avx512vnni compares the VNNI kernels with the vpmaddubsw ones).

    python bench/kernel_speed.py [--formats Q4_0,Q8_0,Q4_K,Q6_K] [--tokens 8,128] [-t 1]
                                 [--rows 2048] [--mv-rows 4096,16384] [--cols 1536]

Best of 5 timed batches after a warm-up. The machine's speed drifts: compare two targets by
alternating runs, not by one run each.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from infer.kernels import blockir, qmatmul as qm
from infer.quant.formats import FORMATS

BY_NAME = {f.name: f for f in FORMATS.values()}


def random_rows(f, rows, cols, rng):
    """rows x cols of format f as raw blocks (random bytes, small random f16 scales), in a buffer with
    64 bytes before and after; returns (buffer, offset)."""
    raw = rng.integers(0, 256, (rows * cols // f.block, f.size), dtype=np.uint8)
    for k in f.f16_at:
        raw[:, k:k + 2] = (rng.standard_normal(raw.shape[0]) * 0.02).astype(np.float16).view(np.uint8).reshape(-1, 2)
    buf = np.zeros(64 + raw.nbytes + 64, np.uint8)
    buf[64:64 + raw.nbytes] = raw.ravel()
    return buf, 64, raw.nbytes


def best_of(fn, work, target=2e8, batches=5):
    fn()
    reps = max(1, int(target // work))
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def matmul_speed(f, rows, cols, n, threads, rng):
    buf, off, _ = random_rows(f, rows, cols, rng)
    tab = np.array([[off, f.id, rows, cols]], np.int64)
    k = qm.kernels(blockir.mask_of([f.id]))
    h = rng.standard_normal((n, cols)).astype(np.float32)
    g = (n + 7) // 8
    hq = np.zeros((g, cols // 32, 8, 32), np.int8)
    xg = np.zeros((g, cols // 32, blockir.XG_FIELDS, 8), np.float32)
    xk = np.zeros(g * 8 * cols, np.int8)
    xkf = np.zeros(g * max(1, cols // 256) * blockir.KF_CELL, np.float32)
    blockir.quantize_prompt(h, hq, xg, False)
    if f.kscales is not None:
        blockir.quantize_rows_k(h, xk, xkf, False)
    out = np.zeros((n, rows), np.float32)
    st = np.zeros(2, np.int64)
    dt = best_of(lambda: k.matmul_i8(buf, tab, hq, xg, xk, xkf, out, threads, st), rows * cols * n)
    return rows * cols * n / dt / 1e9


def matvec_speed(f, rows, cols, threads, rng):
    buf, off, nbytes = random_rows(f, rows, cols, rng)
    tab = np.array([[off, f.id, rows, cols]], np.int64)
    k = qm.kernels(blockir.mask_of([f.id]))
    x = rng.standard_normal(cols).astype(np.float32)
    ng = cols // 32 + 1
    args = (buf, tab, x, np.zeros(2 * ng, np.float32), np.zeros(rows, np.float32), np.array([0]),
            256 if threads == 1 else 64, np.zeros(4, np.int64), np.zeros((numba.config.NUMBA_NUM_THREADS, cols), np.uint32),
            np.zeros(2 * cols, np.int8), np.zeros(8 * ng, np.float32), np.zeros(blockir.XS_PER_GROUP * ng, np.float32), True)
    dt = best_of(lambda: k.mv(*args), nbytes, target=3e8, batches=7)
    return nbytes / dt / 1e9, rows * cols / 256 / dt / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--tokens", default="8,128")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--mv-rows", default="4096,16384")
    ap.add_argument("--cols", type=int, default=1536)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    from infer.kernels import isa
    t = isa.target()
    print(f"kernels for {t.cpu} (avx2 {t.avx2}, vnni {t.vnni}), {a.threads} thread(s), {a.cols} columns")
    rng = np.random.default_rng(0)
    for name in a.formats.split(","):
        f = BY_NAME[name]
        for n in (int(v) for v in a.tokens.split(",") if v):
            print(f"{name:6s} prompt matmul {a.rows} rows x {n:3d} tokens: {matmul_speed(f, a.rows, a.cols, n, a.threads, rng):6.1f} G MAC/s", flush=True)
        for rows in (int(v) for v in a.mv_rows.split(",") if v):
            gbs, mblk = matvec_speed(f, rows, a.cols, a.threads, rng)
            print(f"{name:6s} decode matvec {rows:6d} rows: {gbs:5.1f} GB/s, {mblk:6.1f} M blocks of 256/s", flush=True)


if __name__ == "__main__":
    main()
