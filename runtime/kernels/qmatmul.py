"""Dequant-matvec and dequant kernels over raw GGUF blocks.

Weights are addressed in one flat byte buffer (the memory-mapped file): a tensor is a row of the
int64 table described by TAB_* below. Blocks, their f16 scales included, are read in place from
the file by the block formats' kernels (blockir.py, generated from quant/formats; simd.py's
vector IR converts a scale with one vcvtph2ps; in scalar Numba
the conversion is bit arithmetic, _f16_bits_to_f32_bits). Activations stay float32 (exact enough to match fp32
references; the kernels are memory bound either way).

Shapes: x is float32 (cols,), out float32 (rows,), a tensor is (rows, cols) row-major.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import get_thread_id, njit, prange

from infer.quant.types import BF16, F16, F32

from . import blockir, simd
from .isa import FM

T_F32, T_F16, T_BF16 = F32.id, F16.id, BF16.id

# tensor table columns
TAB_OFF, TAB_TYPE, TAB_ROWS, TAB_COLS = range(4)
TAB_WIDTH = 4
ROW_TILE = 4           # rows per pass in the matvec kernels
TWO112 = np.float32(2.0 ** 112)


@njit(fastmath=FM, cache=True, inline="always")
def _f16_bits_to_f32_bits(h):
    """Branch-free f16 -> f32 bit pattern, to be scaled by 2**112 (exact for normals, subnormals
    and zero; inf/nan become large finite numbers, which never occur in weights)."""
    h = np.uint32(h)
    return ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))


@njit(cache=True, fastmath=FM)
def decode_f16_row(u16, start, n, tmp_u32, tmp_f32, dst, dst_off):
    """dst[dst_off:dst_off+n] = f16 values u16[start:start+n] as float32."""
    for i in range(n):
        tmp_u32[i] = _f16_bits_to_f32_bits(u16[start + i])
    for i in range(n):
        dst[dst_off + i] = tmp_f32[i] * TWO112


@njit(cache=True, fastmath=FM)
def decode_bf16_row(u16, start, n, tmp_u32, tmp_f32, dst, dst_off):
    for i in range(n):
        tmp_u32[i] = np.uint32(u16[start + i]) << np.uint32(16)
    for i in range(n):
        dst[dst_off + i] = tmp_f32[i]


@njit(cache=True, fastmath=FM)
def dequant_rows(mask, wu8, tab, r0, r1, dst, tmp_u32):
    """dst[:r1-r0, :cols] = rows r0..r1 of the tensor `tab` (one table row) as float32 (dst
    C-contiguous)."""
    off, t, cols = tab[TAB_OFF], tab[TAB_TYPE], tab[TAB_COLS]
    tmp_f32 = tmp_u32.view(np.float32)
    if blockir.is_block(t):
        blockir.dequant_rows(mask, t, wu8, off, cols, r0, r1, dst)
    elif t != T_F32 and cols % 32 == 0:
        simd.dequant_rows(wu8, simd.KIND_F16 if t == T_F16 else simd.KIND_BF16, off, cols, r0, r1, dst)
    elif t == T_F32:
        wf = wu8[off:off + tab[TAB_ROWS] * cols * 4].view(np.float32)
        for r in range(r0, r1):
            for c in range(cols):
                dst[r - r0, c] = wf[r * cols + c]
    else:
        w16 = wu8[off:off + tab[TAB_ROWS] * cols * 2].view(np.uint16)
        for r in range(r0, r1):
            row = dst[r - r0]
            if t == T_F16:
                decode_f16_row(w16, r * cols, cols, tmp_u32, tmp_f32, row, 0)
            else:
                decode_bf16_row(w16, r * cols, cols, tmp_u32, tmp_f32, row, 0)


# The parallel regions below hand out their tasks from a shared counter (simd.fetch_add): prange
# alone gives each thread a fixed, equal run of iterations, so one thread slowed down (another
# program on its core, a VM's neighbour) held the whole region back while the others waited at its
# end; here the others take its tasks. prange runs min(tasks, MAX_WORKERS) workers, each taking
# tasks until none is left: any number of them at least the thread count balances.
MAX_WORKERS = 64


@njit(cache=True, fastmath=False)
def group_tasks(tabs, per, starts):
    """Tasks of `per` rows over the matrices `tabs` in turn: starts[j] is matrix j's first task
    (starts: (k+1,) int64 scratch); returns the number of tasks."""
    k = tabs.shape[0]
    starts[0] = 0
    for j in range(k):
        starts[j + 1] = starts[j] + (tabs[j, TAB_ROWS] + per - 1) // per
    return starts[k]


@njit(cache=True, fastmath=False)
def task_matrix(tabs, starts, task):
    """The matrix j that task (group_tasks) falls in, and the column of its results in a row of
    the group's output (the rows of the matrices before it)."""
    j = 0
    col = 0
    while starts[j + 1] <= task:
        col += tabs[j, TAB_ROWS]
        j += 1
    return j, col


@njit(cache=True, fastmath=FM, parallel=True)
def dequant_matrix(mask, wu8, tab, r0, r1, dst, tmp_u32_2d):
    """Parallel dequantization of rows r0..r1 into dst (tiles of 16 rows per task)."""
    n = r1 - r0
    ntask = (n + 15) // 16
    for k in prange(ntask):
        a = r0 + k * 16
        b = min(a + 16, r1)
        dequant_rows(mask, wu8, tab, a, b, dst[a - r0:b - r0], tmp_u32_2d[get_thread_id()])


# ----------------------------------------------------------------------------------------------
# matvec: out[r] = sum_c W[r, c] * x[c] for r in [r0, r1); x float32 (cols,); block formats run
# blockir's kernels (xsum: sums of x per 16 values, their offsets and mins), F32/F16/BF16 these.

@njit(cache=True, fastmath=FM)
def _mv_f32(wf, cols, x, out, o0, r0, r1):
    for r in range(r0, r1):
        a = np.float32(0.0)
        for c in range(cols):
            a += wf[r * cols + c] * x[c]
        out[o0 + r] = a


@njit(cache=True, fastmath=FM)
def _mv_16(w16, is_bf16, cols, x, out, o0, r0, r1, tmp_u32):
    """F16/BF16 rows: decode a row's bits into tmp (float32 view) then dot."""
    tmp_f32 = tmp_u32.view(np.float32)
    for r in range(r0, r1):
        base = r * cols
        if is_bf16:
            for c in range(cols):
                tmp_u32[c] = np.uint32(w16[base + c]) << np.uint32(16)
            a = np.float32(0.0)
            for c in range(cols):
                a += tmp_f32[c] * x[c]
        else:
            for c in range(cols):
                tmp_u32[c] = _f16_bits_to_f32_bits(w16[base + c])
            a = np.float32(0.0)
            for c in range(cols):
                a += tmp_f32[c] * x[c]
            a *= TWO112
        out[o0 + r] = a


@njit(cache=True, fastmath=FM)
def matvec_rows(wu8, tab, x, out, o0, r0, r1, tmp_u32):
    """out[o0 + r] = W[r] . x for rows r0..r1 of an F32, F16 or BF16 tensor described by `tab`
    (matvec_group runs the block types itself): 16-bit rows of whole blocks run the vector-IR
    kernel of simd.py, the scalar kernels above serve F32 and 16-bit rows of other lengths."""
    off, t, cols = tab[TAB_OFF], tab[TAB_TYPE], tab[TAB_COLS]
    if t == T_F32:
        _mv_f32(wu8[off:off + tab[TAB_ROWS] * cols * 4].view(np.float32), cols, x, out, o0, r0, r1)
    elif cols % 32 == 0:
        simd.rows_16(wu8, off, cols, t == T_BF16, x, out, o0, r0, r1)
    else:
        w16 = wu8[off:off + tab[TAB_ROWS] * cols * 2].view(np.uint16)
        _mv_16(w16, t == T_BF16, cols, x, out, o0, r0, r1, tmp_u32)


@njit(cache=True, fastmath=FM, parallel=True)
def matvec_group(mask, wu8, tabs, x, xsum, out, out_offs, chunk, starts, tmp_u32_2d, xq, xd, xsq, use_i8):
    """Several matvecs over the same input x in one parallel region.

    tabs: (k, TAB_WIDTH) tensor rows; out_offs: (k,) offset of each result in `out`;
    chunk: rows per task (multiple of ROW_TILE); starts: (k+1,) int64 scratch;
    tmp_u32_2d: (n_threads, max_cols) scratch, one row per thread.
    xq, xd, xsq (prep_x: blockir.quantize_x and quantize_xk): x quantized to int8 (a scale per 4
    values; per 256 for the 256-value formats); when use_i8, the block formats run the int8
    kernels on them (AVX2 hosts only: callers set it only if simd.HAVE_AVX2).
    One signature for both (the float and int8 paths were two compilations of the whole group,
    and decode_step linked both: about 4 s of the first run's JIT compile).
    """
    ntask = group_tasks(tabs, chunk, starts)
    nxt = np.zeros(1, np.int64)
    for w in prange(min(ntask, MAX_WORKERS)):
        while True:
            task = simd.fetch_add(nxt, 0, 1)
            if task >= ntask:
                break
            j, _ = task_matrix(tabs, starts, task)
            r0 = (task - starts[j]) * chunk
            r1 = min(r0 + chunk, tabs[j, TAB_ROWS])
            # the common types dispatched here, not through matvec_rows: called from inside the
            # parallel region, matvec_rows ran at half speed (measured, SmolLM2 layers 12 vs 24 ms)
            t, off, cols, o0 = tabs[j, TAB_TYPE], tabs[j, TAB_OFF], tabs[j, TAB_COLS], out_offs[j]
            if blockir.is_block(t):
                if use_i8:
                    blockir.rows_i8(mask, t, wu8, off, cols, xq, xd, xsq, out, o0, r0, r1)
                else:
                    blockir.rows_float(mask, t, wu8, off, cols, x, xsum, out, o0, r0, r1)
            else:
                matvec_rows(wu8, tabs[j], x, out, o0, r0, r1, tmp_u32_2d[get_thread_id()])


@njit(cache=True, fastmath=FM)
def prep_x(tabs, x, xsum, xq, xd, xs, use_i8):
    """x's int8 quantizations when use_i8, the ones the matrices `tabs` read (xq: 2 * len(x)
    bytes; xs: blockir.XS_PER_GROUP floats per 32 values): a scale per 4 values for the 32-value
    formats (blockir.quantize_x), per 256 for the 256-value ones (quantize_xk, xq's second half);
    else x's sums per 16 values (xsum: the float kernels' offsets and mins)."""
    if use_i8:
        per4 = False
        per256 = False
        for j in range(tabs.shape[0]):
            bl = blockir.block_of(tabs[j, TAB_TYPE])
            per4 |= bl == 32
            per256 |= bl == 256
        if per4:
            blockir.quantize_x(x, xq[:x.shape[0]], xd, xs)
        if per256:
            blockir.quantize_xk(x, xq, xs)
    else:
        blockir.half_sums(x, xsum)


@njit(fastmath=False, cache=True, parallel=True)
def matmul_i8_group(mask, wu8, tabs, xq, xg, xk, xkf, out, n_threads, starts):
    """out (n, sum of rows) = x @ W.T for one or several block-format matrices on the same int8
    activations (blockir.quantize_rows; the 256-value formats' form from quantize_rows_k in xk,
    xkf) in one parallel region (the prompt's q/k/v, gate/up):
    matrix j's rows at columns from sum(rows of tabs[:j]). n_threads: numba.get_num_threads()
    (called here it would keep this function out of the disk cache); starts: (k+1,) int64 scratch."""
    k = tabs.shape[0]
    # one task size for the whole group, from its total rows (sized per matrix, q's 64 rows and k's
    # and v's 16, prange's fixed equal runs of tasks left one thread q and the other k and v: a
    # 2-thread q/k/v of a GQA model ran at 1.31x its 1-thread speed, 253 vs 193 ms a 1.1B prefill)
    total = 0
    for j in range(k):
        total += tabs[j, TAB_ROWS]
    rt = 1 << 30
    for j in range(k):
        rt = min(rt, blockir.mm_rows_per_task(total, tabs[j, TAB_COLS], tabs[j, TAB_TYPE], n_threads, out.shape[0]))
    ntask = group_tasks(tabs, rt, starts)
    nxt = np.zeros(1, np.int64)
    for w in prange(min(ntask, MAX_WORKERS)):
        while True:
            task = simd.fetch_add(nxt, 0, 1)
            if task >= ntask:
                break
            j, ocol = task_matrix(tabs, starts, task)
            rows, cols, t = tabs[j, TAB_ROWS], tabs[j, TAB_COLS], tabs[j, TAB_TYPE]
            r0 = (task - starts[j]) * rt
            blockir.mm_rows(mask, t, wu8, tabs[j, TAB_OFF], cols, xq, xg, xk, xkf, out, ocol, r0, min(rows, r0 + rt))


@functools.lru_cache(maxsize=None)
def kernels(mask):
    """The entry points called from Python, compiled for the block formats in `mask`
    (blockir.mask_of): held as a constant in each (a closure's cell: Numba caches one compilation
    per value), it reaches blockir's dispatchers as a compile-time literal.

      mv(wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8): prep_x + matvec_group
      mv_prepared(...): matvec_group alone (x's sums or int8 form given: the tests)
      matmul_i8(wu8, tabs, xq, xg, xk, xkf, out, n_threads, starts): matmul_i8_group
      dequant(wu8, tab, r0, r1, dst, tmp_u32): dequant_rows
      dequant_par(wu8, tab, r0, r1, dst, tmp_u32_2d): dequant_matrix
    """
    @njit(cache=True, fastmath=FM)
    def mv(wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8):
        prep_x(tabs, x, xsum, xq, xd, xsq, use_i8)
        matvec_group(mask, wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8)

    @njit(cache=True, fastmath=FM)
    def mv_prepared(wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8):
        matvec_group(mask, wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8)

    @njit(fastmath=False, cache=True)
    def matmul_i8(wu8, tabs, xq, xg, xk, xkf, out, n_threads, starts):
        matmul_i8_group(mask, wu8, tabs, xq, xg, xk, xkf, out, n_threads, starts)

    @njit(fastmath=FM, cache=True)
    def dequant(wu8, tab, r0, r1, dst, tmp_u32):
        dequant_rows(mask, wu8, tab, r0, r1, dst, tmp_u32)

    @njit(fastmath=FM, cache=True)
    def dequant_par(wu8, tab, r0, r1, dst, tmp_u32_2d):
        dequant_matrix(mask, wu8, tab, r0, r1, dst, tmp_u32_2d)

    return SimpleNamespace(mask=mask, mv=mv, mv_prepared=mv_prepared, matmul_i8=matmul_i8, dequant=dequant,
                           dequant_par=dequant_par)
