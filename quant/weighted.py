"""Importance-weighted quantizers for Q4_0 and Q4_1 (Numba): the same block formats, better blocks.

Round-to-max (the reference codecs) fixes a block's scale from its largest value. Given an
importance per input channel (an importance matrix, see quant/imatrix.py: the mean square of the
activations that multiply that column of the weight), a quantized row's output error on those
activations is, to first order,

    E[(sum_j (w_j - wq_j) a_j)^2]  ~=  sum_j E[a_j^2] (w_j - wq_j)^2        (cross terms dropped)

so each block of 32 values x_j with weights c_j = E[a_j^2] gets the scale (and minimum) that
minimize sum_j c_j (x_j - wq_j)^2:

  Q4_0  x ~= d * q, q in -8..7. For a fixed inverse scale s the best integers are
        q_j = clamp(round(s x_j)), and for fixed integers the best scale is d = sum c x q / sum c q^2
        (error reduction (sum c x q)^2 / sum c q^2). As s sweeps up (both signs) the integers change
        one step at a time, at s = (k + 1/2) / |x_j|: sorting those events and updating the two sums
        at each one visits every rounding that can be optimal, so the block gets the exact minimum
        of the weighted error over all scales between max|x| / 24.5 and max|x| / 2.5 (round-to-max
        is max|x| / 8), not a grid of candidate scales.
  Q4_1  x ~= d * q + m, q in 0..15. A grid of clipped ranges [lo, hi] inside [min, max] gives
        candidate integers; (d, m) is the weighted least-squares fit of each; the best one is then
        refined by alternating (integers given (d, m), then (d, m) given the integers).

Rows are searched in parallel (Numba prange). The scales are then rounded to float16 (numpy's cast, as the reference codecs do) and the integers
recomputed for the rounded scale (and minimum), which is optimal for it. The output is standard
Q4_0 / Q4_1 blocks: any GGUF runtime reads them.

    quantize_rows_weighted(x, qt, importance) -> (n_rows, qt.row_bytes(n_cols)) uint8
        x: (n_rows, n_cols) float32; importance: (n_cols,) float >= 0 (per input channel)
"""
from __future__ import annotations

import numpy as np
import infer.kernels  # noqa: F401  (how Numba loads cached code: kernels/numba_load.py)
from numba import njit, prange

from .types import Q4_0, Q4_1, QType

QK = 32
# Q4_0 search window: inverse scales s with s * max|x| in [T_LO, T_HI] (round-to-max is 8)
T_LO = 2.5
T_HI = 24.5
# Q4_1 search grid: lo moves up / hi moves down by 0..(_GRID-1) steps of (max - min) / _GRID_DIV
_GRID = 8
_GRID_DIV = np.float32(40.0)


@njit(fastmath=False, cache=True)
def _q4_0_scale(x, c, ev_t, ev_j, q):
    """The scale d minimizing sum c (x - d q)^2 over q in -8..7, among the scales whose inverse s
    lies in [T_LO, T_HI] / max|x| (exact sweep over that window). x, c: (32,) float64."""
    n = x.shape[0]
    amax = 0.0
    for j in range(n):
        if abs(x[j]) > amax:
            amax = abs(x[j])
    if amax == 0.0:
        return 0.0
    t_lo = T_LO / amax
    t_hi = T_HI / amax
    best = -1.0
    best_d = 0.0
    for sign in (1.0, -1.0):
        # the integers at s = sign * t_lo, and the sums, then the events inside the window
        sxq = 0.0
        sqq = 0.0
        ne = 0
        for j in range(n):
            y = sign * x[j]
            qj = min(7.0, max(-8.0, np.floor(y * t_lo + 0.5)))
            q[j] = qj
            sxq += c[j] * x[j] * qj
            sqq += c[j] * qj * qj
            if y > 0.0:
                for k in range(int(qj), 7):             # q_j steps up to 7 at t = (k + 1/2) / y
                    t = (k + 0.5) / y
                    if t > t_hi:
                        break
                    ev_t[ne] = t
                    ev_j[ne] = j
                    ne += 1
            elif y < 0.0:
                for k in range(int(-qj), 8):            # q_j steps down to -8
                    t = (k + 0.5) / -y
                    if t > t_hi:
                        break
                    ev_t[ne] = t
                    ev_j[ne] = j
                    ne += 1
        if sqq > 0.0 and sxq * sxq > best * sqq:
            best = sxq * sxq / sqq
            best_d = sxq / sqq
        order = np.argsort(ev_t[:ne])
        for e in range(ne):
            j = ev_j[order[e]]
            step = 1.0 if sign * x[j] > 0.0 else -1.0
            cj = c[j]
            sxq += cj * x[j] * step
            sqq += cj * (2.0 * q[j] * step + 1.0)
            q[j] += step
            # (sum c x q)^2 / sum c q^2 is the error reduction of these integers with their best
            # scale; inside a tie group any order is fine: every integer vector is a valid block
            if sqq > 0.0 and sxq * sxq > best * sqq:
                best = sxq * sxq / sqq
                best_d = sxq / sqq
    if best <= 0.0:
        return 0.0
    return best_d


@njit(fastmath=False, cache=True, parallel=True)
def q4_0_scales_kernel(x, c, scales):
    """x: (n_rows, n_cols) f32; c: (n_cols,) f64 weights; scales: (n_rows, nb) f32 out. Rows in parallel."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    for r in prange(n_rows):
        ev_t = np.empty(QK * 8, np.float64)
        ev_j = np.empty(QK * 8, np.int64)
        q = np.zeros(QK, np.float64)
        xb = np.empty(QK, np.float64)
        cb = np.empty(QK, np.float64)
        for b in range(nb):
            for j in range(QK):
                xb[j] = x[r, b * QK + j]
                cb[j] = c[b * QK + j]
            scales[r, b] = _q4_0_scale(xb, cb, ev_t, ev_j, q)


@njit(fastmath=False, cache=True)
def q4_0_pack_kernel(x, scales, out):
    """Integers for fixed (float16-rounded) scales: q = clamp(round(x / d), -8, 7), stored q + 8."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    for r in range(n_rows):
        for b in range(nb):
            d = scales[r, b]
            inv = 1.0 / d if d != 0.0 else 0.0
            o = b * 18 + 2
            for j in range(16):
                q0 = min(7, max(-8, int(np.round(x[r, b * QK + j] * inv)))) + 8
                q1 = min(7, max(-8, int(np.round(x[r, b * QK + j + 16] * inv)))) + 8
                out[r, o + j] = np.uint8(q0 | (q1 << 4))


@njit(fastmath=False, cache=True)
def _fit_dm(x, c, q):
    """Weighted least squares (d, m) for x ~= d q + m; returns (d, m, error)."""
    sw = sq = sqq = sx = sxq = 0.0
    for j in range(x.shape[0]):
        cj = c[j]
        sw += cj
        sq += cj * q[j]
        sqq += cj * q[j] * q[j]
        sx += cj * x[j]
        sxq += cj * x[j] * q[j]
    det = sw * sqq - sq * sq
    if det <= 0.0 or sw <= 0.0:
        return 0.0, (sx / sw if sw > 0.0 else 0.0), np.inf
    d = (sw * sxq - sx * sq) / det
    m = (sqq * sx - sq * sxq) / det
    err = 0.0
    for j in range(x.shape[0]):
        e = x[j] - d * q[j] - m
        err += c[j] * e * e
    return d, m, err


@njit(fastmath=False, cache=True)
def _q4_1_block(x, c, q):
    n = x.shape[0]
    lo = x[0]
    hi = x[0]
    for j in range(1, n):
        lo = min(lo, x[j])
        hi = max(hi, x[j])
    rng = hi - lo
    if rng == 0.0:
        return 0.0, lo
    best_err = np.inf
    best_d = rng / 15.0
    best_m = lo
    step = rng / _GRID_DIV
    for a in range(_GRID):
        for b in range(_GRID):
            l0 = lo + a * step
            h0 = hi - b * step
            inv = 15.0 / (h0 - l0)
            for j in range(n):
                q[j] = min(15, max(0, int(np.round((x[j] - l0) * inv))))
            d, m, err = _fit_dm(x, c, q)
            if err < best_err and d > 0.0:
                best_err, best_d, best_m = err, d, m
    for _ in range(3):                              # alternate: integers | (d, m)
        inv = 1.0 / best_d
        for j in range(n):
            q[j] = min(15, max(0, int(np.round((x[j] - best_m) * inv))))
        d, m, err = _fit_dm(x, c, q)
        if not (err < best_err and d > 0.0):
            break
        best_err, best_d, best_m = err, d, m
    return best_d, best_m


@njit(fastmath=False, cache=True, parallel=True)
def q4_1_scales_kernel(x, c, scales, mins):
    """x: (n_rows, n_cols) f32; c: (n_cols,) f64 weights; scales, mins: (n_rows, nb) f32 out."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    for r in prange(n_rows):
        q = np.zeros(QK, np.int64)
        xb = np.empty(QK, np.float64)
        cb = np.empty(QK, np.float64)
        for b in range(nb):
            for j in range(QK):
                xb[j] = x[r, b * QK + j]
                cb[j] = c[b * QK + j]
            d, m = _q4_1_block(xb, cb, q)
            scales[r, b] = d
            mins[r, b] = m


@njit(fastmath=False, cache=True)
def q4_1_pack_kernel(x, scales, mins, out):
    """Integers for fixed (float16-rounded) d and m: q = clamp(round((x - m) / d), 0, 15)."""
    n_rows, n_cols = x.shape
    nb = n_cols // QK
    for r in range(n_rows):
        for b in range(nb):
            d = scales[r, b]
            m = mins[r, b]
            inv = 1.0 / d if d != 0.0 else 0.0
            o = b * 20 + 4
            for j in range(16):
                q0 = min(15, max(0, int(np.round((x[r, b * QK + j] - m) * inv))))
                q1 = min(15, max(0, int(np.round((x[r, b * QK + j + 16] - m) * inv))))
                out[r, o + j] = np.uint8(q0 | (q1 << 4))


def _f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16)


def block_weights(importance: np.ndarray, n_cols: int) -> np.ndarray:
    """The per-column weights the block search uses: the importance, with a floor (1e-6 of its mean)
    so that a channel never seen active still counts a little and no block is all zero weight."""
    imp = np.asarray(importance, np.float64).reshape(-1)
    if imp.shape[0] != n_cols:
        raise ValueError(f"importance has {imp.shape[0]} values for rows of {n_cols}")
    if not np.all(np.isfinite(imp)) or (imp < 0).any():
        raise ValueError("importance must be finite and >= 0")
    mean = imp.mean()
    floor = 1e-6 * mean if mean > 0 else 1.0
    return np.maximum(imp, floor)


def quantize_rows_weighted(x: np.ndarray, qt: QType, importance: np.ndarray) -> np.ndarray:
    """Quantize float32 rows x (n_rows, n_cols) to Q4_0 / Q4_1 minimizing the importance-weighted
    squared error; returns (n_rows, qt.row_bytes(n_cols)) uint8 (standard blocks)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    n_rows, n_cols = x.shape
    if n_cols % QK:
        raise ValueError(f"row length {n_cols} is not a multiple of the {qt.name} block size {QK}")
    c = block_weights(importance, n_cols)
    nb = n_cols // QK
    out = np.empty((n_rows, qt.row_bytes(n_cols)), dtype=np.uint8)
    blocks = out.reshape(n_rows, nb, qt.type_size)
    scales = np.empty((n_rows, nb), np.float32)
    if qt is Q4_0:
        q4_0_scales_kernel(x, c, scales)
        d16 = _f16(scales)
        q4_0_pack_kernel(x, d16.astype(np.float32), out)
        blocks[:, :, 0:2] = d16.view(np.uint8).reshape(n_rows, nb, 2)
    elif qt is Q4_1:
        mins = np.empty((n_rows, nb), np.float32)
        q4_1_scales_kernel(x, c, scales, mins)
        d16, m16 = _f16(scales), _f16(mins)
        q4_1_pack_kernel(x, d16.astype(np.float32), m16.astype(np.float32), out)
        blocks[:, :, 0:2] = d16.view(np.uint8).reshape(n_rows, nb, 2)
        blocks[:, :, 2:4] = m16.view(np.uint8).reshape(n_rows, nb, 2)
    else:
        raise NotImplementedError(f"no importance-weighted quantizer for {qt.name} (Q4_0, Q4_1)")
    return out


WEIGHTED = (Q4_0, Q4_1)
