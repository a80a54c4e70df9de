"""Fast quantizers (Numba), bit-identical to the numpy reference codecs in quant/codecs.py.

Each kernel walks rows of float32 values block by block in float32 arithmetic (no float64 promotion,
no fused multiply-add) and writes the integer part of the blocks into a caller-provided uint8 buffer,
returning the block scales as float32. The scales are then rounded to float16 by numpy's own cast,
the same cast the reference uses, and stored into the blocks: the two halves of a block are thus
produced by the same operations as the reference, and the bytes are the same.

    quantize_rows(x, qt) -> (n_rows, qt.row_bytes(n_cols)) uint8     x: (n_rows, n_cols) float32

Nothing is compiled at import; the first call compiles (cached on disk: cache=True).
"""
from __future__ import annotations

import numpy as np
import infer.kernels  # noqa: F401  (how Numba loads cached code: kernels/numba_load.py)
from numba import njit

from .types import BF16, F16, F32, Q4_0, Q4_1, Q8_0, QType

QK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1


@njit(fastmath=False, cache=True)
def _round_half_away(v):
    # C roundf on a float32: floor(|v|) + floor(2 * frac(|v|)), sign of v (exact in float32)
    a = abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return -r if v < 0 else r


@njit(fastmath=False, cache=True)
def q8_0_kernel(x, out, scales):
    """x: (n_rows, n_cols) f32; out: (n_rows, n_cols // 32 * 34) u8 (qs written, d left); scales: (n_rows, nb) f32."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    zero = np.float32(0.0)
    one = np.float32(1.0)
    c127 = np.float32(127.0)
    for r in range(n_rows):
        for b in range(nb):
            base = b * QK
            amax = zero
            for j in range(QK):
                a = abs(x[r, base + j])
                if a > amax:
                    amax = a
            d = np.float32(amax / c127)
            inv = np.float32(one / d) if d != zero else zero
            o = b * 34 + 2
            for j in range(QK):
                q = _round_half_away(np.float32(x[r, base + j] * inv))
                out[r, o + j] = np.uint8(np.int32(q) & 0xFF)
            scales[r, b] = d


@njit(fastmath=False, cache=True)
def q4_0_kernel(x, out, scales):
    """x: (n_rows, n_cols) f32; out: (n_rows, n_cols // 32 * 18) u8; scales: (n_rows, nb) f32."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    zero = np.float32(0.0)
    one = np.float32(1.0)
    m8 = np.float32(-8.0)
    half8 = np.float32(8.5)
    for r in range(n_rows):
        for b in range(nb):
            base = b * QK
            amax = np.float32(-1.0)
            vmax = zero
            for j in range(QK):          # the first value of largest magnitude (numpy argmax)
                v = x[r, base + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            d = np.float32(vmax / m8)
            inv = np.float32(one / d) if d != zero else zero
            o = b * 18 + 2
            for j in range(16):
                q0 = np.int32(np.trunc(np.float32(np.float32(x[r, base + j] * inv) + half8)))
                q1 = np.int32(np.trunc(np.float32(np.float32(x[r, base + j + 16] * inv) + half8)))
                q0 = min(q0, 15)
                q1 = min(q1, 15)
                out[r, o + j] = np.uint8(q0 | (q1 << 4))
            scales[r, b] = d


@njit(fastmath=False, cache=True)
def q4_1_kernel(x, out, scales, mins):
    """x: (n_rows, n_cols) f32; out: (n_rows, n_cols // 32 * 20) u8; scales, mins: (n_rows, nb) f32."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    zero = np.float32(0.0)
    one = np.float32(1.0)
    c15 = np.float32(15.0)
    half = np.float32(0.5)
    for r in range(n_rows):
        for b in range(nb):
            base = b * QK
            lo = x[r, base]
            hi = x[r, base]
            for j in range(1, QK):
                v = x[r, base + j]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            d = np.float32(np.float32(hi - lo) / c15)
            inv = np.float32(one / d) if d != zero else zero
            o = b * 20 + 4
            for j in range(16):
                q0 = np.int32(np.trunc(np.float32(np.float32(np.float32(x[r, base + j] - lo) * inv) + half)))
                q1 = np.int32(np.trunc(np.float32(np.float32(np.float32(x[r, base + j + 16] - lo) * inv) + half)))
                q0 = min(q0, 15)
                q1 = min(q1, 15)
                out[r, o + j] = np.uint8(q0 | (q1 << 4))
            scales[r, b] = d
            mins[r, b] = lo


@njit(fastmath=False, cache=True)
def bf16_kernel(xu, out):
    """xu: (n,) u32 (float32 bits); out: (n,) u16. Round to nearest even; NaN -> quiet NaN."""
    for i in range(xu.shape[0]):
        n = np.uint64(xu[i])
        if (n & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):
            n = (n & np.uint64(0xFFFF0000)) | np.uint64(0x00400000)
        n = (n + (np.uint64(0x7FFF) + ((n >> np.uint64(16)) & np.uint64(1)))) >> np.uint64(16)
        out[i] = np.uint16(n & np.uint64(0xFFFF))


def _store_f16(out: np.ndarray, values: np.ndarray, type_size: int, at: int) -> None:
    """Write float32 `values` (n_rows, nb) as float16 at byte `at` of every block of `out`."""
    blocks = out.reshape(out.shape[0], -1, type_size)
    with np.errstate(over="ignore"):
        blocks[:, :, at:at + 2] = values.astype(np.float16).view(np.uint8).reshape(blocks.shape[0], -1, 2)


def quantize_rows(x: np.ndarray, qt: QType) -> np.ndarray:
    """Quantize float32 rows x (n_rows, n_cols) to qt; returns (n_rows, qt.row_bytes(n_cols)) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    n_rows, n_cols = x.shape
    if n_cols % qt.block_size:
        raise ValueError(f"row length {n_cols} is not a multiple of the {qt.name} block size {qt.block_size}")
    if qt is F32:
        return x.view(np.uint8)
    if qt is F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint8)
    if qt is BF16:
        out = np.empty(x.size, dtype=np.uint16)
        bf16_kernel(x.reshape(-1).view(np.uint32), out)
        return out.view(np.uint8).reshape(n_rows, n_cols * 2)
    nb = n_cols // QK
    out = np.empty((n_rows, qt.row_bytes(n_cols)), dtype=np.uint8)
    scales = np.empty((n_rows, nb), dtype=np.float32)
    if qt is Q8_0:
        q8_0_kernel(x, out, scales)
        _store_f16(out, scales, 34, 0)
    elif qt is Q4_0:
        q4_0_kernel(x, out, scales)
        _store_f16(out, scales, 18, 0)
    elif qt is Q4_1:
        mins = np.empty((n_rows, nb), dtype=np.float32)
        q4_1_kernel(x, out, scales, mins)
        _store_f16(out, scales, 20, 0)
        _store_f16(out, mins, 20, 2)
    else:
        raise NotImplementedError(f"no quantizer for {qt.name}")
    return out


SUPPORTED = (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
