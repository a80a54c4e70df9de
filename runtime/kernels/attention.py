"""Attention over the KV cache.

Cache layout: k, v (n_layers, n_kv_heads, n_slots, head_dim) float32, keys stored after RoPE.
A slot's token position is kpos[slot]; a query at position p sees the filled slots whose position
is <= p (causal mask that also holds for a ring buffer whose slots are out of order).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ops import exp32, softmax_inplace
from .qmatmul import FM


@njit(cache=True, fastmath=FM, parallel=True)
def attend_one(q, kc, vc, n_filled, scale, n_heads, n_kv, head_dim, scores, out):
    """Decode: one query (n_heads*head_dim,) against slots 0..n_filled of one layer's cache
    kc, vc (n_kv, n_slots, head_dim); scores (n_heads, n_slots) scratch; out (n_heads*head_dim,).
    Heads in parallel; each works on 1-D contiguous rows (the slot's key, its value), whose
    unit-stride loops LLVM vectorizes (3-D indexing in the loops ran 4-7x slower)."""
    group = n_heads // n_kv
    for h in prange(n_heads):
        kg = kc[h // group]
        vg = vc[h // group]
        qh = q[h * head_dim:(h + 1) * head_dim]
        sc = scores[h]
        for j in range(n_filled):
            kj = kg[j]
            s = np.float32(0.0)
            for d in range(head_dim):
                s += qh[d] * kj[d]
            sc[j] = s * scale
        softmax_inplace(sc, n_filled)
        o = out[h * head_dim:(h + 1) * head_dim]
        o[:] = 0.0
        for j in range(n_filled):
            p = sc[j]
            vj = vg[j]
            for d in range(head_dim):
                o[d] += p * vj[d]


@njit(cache=True, fastmath=FM, nogil=True)
def masked_softmax(s, qpos, group, kpos, n_filled, scale):
    """Prefill scores s (n*group, n_slots) for queries (row t*group+g at position qpos[t]):
    scale, mask slots with kpos > qpos or beyond n_filled, softmax in place."""
    rows, m = s.shape
    for r in range(rows):
        p = qpos[r // group]
        mx = -np.inf
        for j in range(n_filled):
            if kpos[j] <= p:
                v = s[r, j] * scale
                s[r, j] = v
                if v > mx:
                    mx = v
        tot = np.float32(0.0)
        for j in range(n_filled):
            if kpos[j] <= p:
                e = exp32(s[r, j] - mx)
                s[r, j] = e
                tot += e
            else:
                s[r, j] = 0.0
        inv = np.float32(1.0) / tot
        for j in range(n_filled):
            s[r, j] *= inv
        for j in range(n_filled, m):
            s[r, j] = 0.0
