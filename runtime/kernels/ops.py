"""Element-wise and normalization kernels. All write into caller-provided buffers.

Shapes: x (n, dim) float32 rows (a single token is n = 1); weights float32 (dim,).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .qmatmul import FM

ROPE_NORM, ROPE_NEOX = 0, 2   # ggml's rope modes: adjacent pairs (llama) or split halves (qwen2)


@njit(cache=True, fastmath=FM)
def rmsnorm(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w   for each row i of x (n, dim)."""
    n, dim = x.shape
    for i in range(n):
        ss = np.float32(0.0)
        for j in range(dim):
            ss += x[i, j] * x[i, j]
        inv = np.float32(1.0 / math.sqrt(ss / dim + eps))
        for j in range(dim):
            out[i, j] = x[i, j] * inv * w[j]


@njit(cache=True, fastmath=FM)
def rope_inv_freq(rope_dim, base, out):
    """out[i] = base^(-2i/rope_dim), i < rope_dim/2 (computed in float64 like ggml's theta scale)."""
    for i in range(rope_dim // 2):
        out[i] = base ** (-2.0 * i / rope_dim)


@njit(cache=True, fastmath=FM)
def rope(x, n_heads, head_dim, rope_dim, positions, inv_freq, mode):
    """Rotate heads in place: x (n, n_heads*head_dim), positions (n,) int64."""
    n = x.shape[0]
    half = rope_dim // 2
    for t in range(n):
        p = positions[t]
        for i in range(half):
            ang = p * inv_freq[i]
            c = np.float32(math.cos(ang))
            s = np.float32(math.sin(ang))
            for h in range(n_heads):
                base = h * head_dim
                if mode == ROPE_NEOX:
                    a = base + i
                    b = base + i + half
                else:
                    a = base + 2 * i
                    b = a + 1
                x0 = x[t, a]
                x1 = x[t, b]
                x[t, a] = x0 * c - x1 * s
                x[t, b] = x0 * s + x1 * c


@njit(cache=True, fastmath=FM)
def silu_mul(g, u, out):
    """out = silu(g) * u, element-wise over (n, ff)."""
    n, m = g.shape
    for i in range(n):
        for j in range(m):
            v = g[i, j]
            out[i, j] = v / (np.float32(1.0) + np.float32(math.exp(-v))) * u[i, j]


@njit(cache=True, fastmath=FM, parallel=True)
def silu_mul_par(g, u, out):
    """silu_mul with the rows in parallel (a prompt's chunk when Numba, not BLAS, has the cores:
    next to multi-threaded BLAS a Numba region's spinning threads slow both)."""
    n, m = g.shape
    for i in prange(n):
        for j in range(m):
            v = g[i, j]
            out[i, j] = v / (np.float32(1.0) + np.float32(math.exp(-v))) * u[i, j]


@njit(cache=True, fastmath=FM)
def softmax_inplace(v, k):
    """In place softmax over v[:k]."""
    mx = -np.inf
    for j in range(k):
        if v[j] > mx:
            mx = v[j]
    s = np.float32(0.0)
    for j in range(k):
        e = np.float32(math.exp(v[j] - mx))
        v[j] = e
        s += e
    inv = np.float32(1.0) / s
    for j in range(k):
        v[j] *= inv


@njit(cache=True, fastmath=FM)
def softmax_rows(x, n_valid):
    """In place softmax over the first n_valid[i] entries of each row; the rest set to 0."""
    n, m = x.shape
    for i in range(n):
        k = n_valid[i]
        softmax_inplace(x[i], k)
        for j in range(k, m):
            x[i, j] = 0.0
