"""Element-wise and normalization kernels. All write into caller-provided buffers.

Shapes: x (n, dim) float32 rows (a single token is n = 1); weights float32 (dim,).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .qmatmul import FM

ROPE_NORM, ROPE_NEOX = 0, 2   # ggml's rope modes: adjacent pairs (llama) or split halves (qwen2)


@intrinsic
def _bits_f32(typingctx, v):
    """The float32 whose bits are the int32 v."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath={"contract"})
def exp32(x):
    """e**x for float32 x, within 1 ulp of float64 exp over [-87, 88] (measured) (inputs
    outside are clamped: below gives ~1e-38, above e**88). Unlike math.exp (a libm call per
    element) it vectorizes: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is exact),
    e**r by a degree-7 polynomial (the coefficients of Cephes' expf), 2**n put in the exponent
    bits. Its own fastmath flags keep the callers' reassociation out of the range reduction."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _bits_f32((np.int32(n) + np.int32(127)) << np.int32(23))


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
def head_rmsnorm(x, n_heads, head_dim, w, eps):
    """In place, each head of each row of x (n, >= n_heads*head_dim): RMSNorm over its head_dim
    values with the weights w (head_dim,) (Qwen3's and Gemma 3's q/k norms)."""
    for i in range(x.shape[0]):
        for h in range(n_heads):
            o = h * head_dim
            ss = np.float32(0.0)
            for j in range(head_dim):
                ss += x[i, o + j] * x[i, o + j]
            inv = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for j in range(head_dim):
                x[i, o + j] = x[i, o + j] * inv * w[j]


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


# The FFN's activations over a prompt's gate|up rows: gu (n, 2 ff) C-contiguous, gate in columns
# [:ff], up in [ff:]; out (n, >= ff) C-contiguous, may be gu itself (the result then overwrites the
# gate half). Whole rows, not the halves as views: on strided 2-d views Numba kept the loop scalar
# (SiLU of Qwen2.5-1.5B's 128 x 8960: 1.58 ms vs 0.19 ms), 3 % of its prefill.

@njit(cache=True, fastmath=FM, error_model="numpy")
def silu_mul(gu, out):
    """out[:, :ff] = silu(gate) * up. (error_model="numpy": with Python's ZeroDivisionError check
    the division kept the loop scalar, 5x slower.)"""
    n, ff = gu.shape[0], gu.shape[1] // 2
    for i in range(n):
        for j in range(ff):
            v = gu[i, j]
            out[i, j] = v / (np.float32(1.0) + exp32(-v)) * gu[i, ff + j]


@njit(cache=True, fastmath=FM, parallel=True, error_model="numpy")
def silu_mul_par(gu, out):
    """silu_mul with the rows in parallel (a prompt's chunk when Numba, not BLAS, has the cores:
    next to multi-threaded BLAS a Numba region's spinning threads slow both)."""
    n, ff = gu.shape[0], gu.shape[1] // 2
    for i in prange(n):
        for j in range(ff):
            v = gu[i, j]
            out[i, j] = v / (np.float32(1.0) + exp32(-v)) * gu[i, ff + j]


@njit(cache=True, fastmath=FM)
def gelu(v):
    """GELU, tanh form (transformers' gelu_pytorch_tanh; Gemma's FFN): 0.5 v (1 + tanh(y)) with
    y = sqrt(2/pi) (v + 0.044715 v^3), computed as v / (1 + e^(-2y)) (the same function: 1 + tanh(y)
    = 2 / (1 + e^(-2y)), no cancellation near tanh = -1) on exp32, so that the loops vectorize (np.tanh
    is a libm call per element: 19 ns, a fifth of Gemma 3 270M's prefill)."""
    y = np.float32(-1.5957691216057308) * (v + np.float32(0.044715) * v * v * v)
    return v / (np.float32(1.0) + exp32(y))


@njit(cache=True, fastmath=FM, error_model="numpy")
def gelu_mul(gu, out):
    """out[:, :ff] = gelu(gate) * up (gu, out: as silu_mul's)."""
    n, ff = gu.shape[0], gu.shape[1] // 2
    for i in range(n):
        for j in range(ff):
            out[i, j] = gelu(gu[i, j]) * gu[i, ff + j]


@njit(cache=True, fastmath=FM, parallel=True, error_model="numpy")
def gelu_mul_par(gu, out):
    """gelu_mul with the rows in parallel (see silu_mul_par)."""
    n, ff = gu.shape[0], gu.shape[1] // 2
    for i in prange(n):
        for j in range(ff):
            out[i, j] = gelu(gu[i, j]) * gu[i, ff + j]


@njit(cache=True, fastmath=FM)
def softmax_inplace(v, k):
    """In place softmax over v[:k]."""
    mx = -np.inf
    for j in range(k):
        if v[j] > mx:
            mx = v[j]
    s = np.float32(0.0)
    for j in range(k):
        e = exp32(v[j] - mx)
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
