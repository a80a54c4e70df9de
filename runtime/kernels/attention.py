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
from .simd import fetch_add


@njit(cache=True, fastmath=FM)
def _dots(qh, kg, lim, scale, sc):
    """sc[j] = scale * (qh . kg[j]) for the slots j < lim of one KV head: 1-D contiguous rows,
    whose unit-stride loops LLVM vectorizes (3-D indexing in the loops ran 4-7x slower)."""
    for j in range(lim):
        kj = kg[j]
        s = np.float32(0.0)
        for d in range(qh.shape[0]):
            s += qh[d] * kj[d]
        sc[j] = s * scale


@njit(cache=True, fastmath=FM)
def _mix(sc, vg, lim, o):
    """o = sum over the slots j < lim of sc[j] * vg[j] (the softmax-weighted values)."""
    o[:] = 0.0
    for j in range(lim):
        p = sc[j]
        vj = vg[j]
        for d in range(o.shape[0]):
            o[d] += p * vj[d]


@njit(cache=True, fastmath=FM)
def _head(qh, kg, vg, kpos, lim, p, window, scale, sc, o):
    """One query head at position p over the slots j < lim of one KV head (kg, vg (n_slots,
    head_dim)) into o: slots with kpos[j] > p (a wrapped ring's newer tokens) or, with a sliding
    window > 0, kpos[j] <= p - window get weight 0; sc (>= lim) scratch."""
    lo = p - window + 1 if window > 0 else -(1 << 62)
    hidden = 0
    for j in range(lim):
        if kpos[j] > p or kpos[j] < lo:
            hidden += 1
    _dots(qh, kg, lim, scale, sc)
    if hidden:
        for j in range(lim):
            if kpos[j] > p or kpos[j] < lo:
                sc[j] = -np.inf
    softmax_inplace(sc, lim)
    if hidden:
        for j in range(lim):
            if kpos[j] > p or kpos[j] < lo:
                sc[j] = 0.0
    _mix(sc, vg, lim, o)


@njit(cache=True, fastmath=FM, parallel=True)
def attend_one(q, kc, vc, n_filled, scale, n_heads, n_kv, head_dim, scores, out, kpos, lo):
    """Decode: one query (n_heads*head_dim,) against slots 0..n_filled of one layer's cache
    kc, vc (n_kv, n_slots, head_dim); scores (n_heads, n_slots) scratch; out (n_heads*head_dim,).
    Heads in parallel. A sliding-window layer sees only the slots with kpos >= lo (lo <= 0: all)."""
    group = n_heads // n_kv
    for h in prange(n_heads):
        sc = scores[h]
        _dots(q[h * head_dim:(h + 1) * head_dim], kc[h // group], n_filled, scale, sc)
        if lo > 0:
            for j in range(n_filled):
                if kpos[j] < lo:
                    sc[j] = -np.inf
        softmax_inplace(sc, n_filled)
        _mix(sc, vc[h // group], n_filled, out[h * head_dim:(h + 1) * head_dim])


@njit(cache=True, fastmath=FM, nogil=True)
def masked_softmax(s, qpos, group, kpos, n_filled, scale, window):
    """Prefill scores s (n*group, n_slots) for queries (row t*group+g at position qpos[t]):
    scale, mask slots with kpos > qpos or beyond n_filled (and, with a sliding window > 0, those
    with kpos <= qpos - window), softmax in place."""
    rows, m = s.shape
    for r in range(rows):
        p = qpos[r // group]
        lo = p - window + 1 if window > 0 else -(1 << 62)
        mx = -np.inf
        for j in range(n_filled):
            if lo <= kpos[j] <= p:
                v = s[r, j] * scale
                s[r, j] = v
                if v > mx:
                    mx = v
        tot = np.float32(0.0)
        for j in range(n_filled):
            if lo <= kpos[j] <= p:
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


@njit(cache=True, fastmath=FM, parallel=True)
def attend_rows(q, kc, vc, qpos, kpos, n_filled, scale, scores, out, window):
    """Prefill: queries at positions qpos against slots 0..n_filled of one layer's cache kc, vc
    (n_kv, n_slots, head_dim) into out (n, n_heads*head_dim); a query sees the slots with kpos <=
    its position. q (n, >= n_heads*head_dim) holds the queries at the start of each row (the
    prompt's q|k|v buffer, C-contiguous: a strided view of it ran 4x slower, its rows' unit
    stride unknown to LLVM). One parallel region: scores.shape[0] workers take the
    (query, head) pairs from a shared counter as they finish (the causal triangle's long and
    short rows share out evenly, and a slowed thread's pairs go to the others), each on its own row of scores (>= n_filled floats), with decode's loops
    (_dots, softmax, _mix); a linear cache's slots past the last visible one are skipped, the
    hidden slots of a wrapped ring get weight 0, and so do, with a sliding window > 0, the slots
    at or before qpos - window."""
    hd = kc.shape[2]
    n, n_heads = out.shape[0], out.shape[1] // hd
    group = n_heads // kc.shape[0]
    nw = scores.shape[0]
    total = n * n_heads
    nxt = np.zeros(1, np.int64)
    for w in prange(nw):
        sc = scores[w]
        while True:
            task = fetch_add(nxt, 0, 1)         # the pairs handed out in turn (qmatmul.MAX_WORKERS)
            if task >= total:
                break
            t = task // n_heads
            h = task - t * n_heads
            p = qpos[t]
            lim = n_filled
            while lim > 0 and kpos[lim - 1] > p:
                lim -= 1
            _head(q[t, h * hd:(h + 1) * hd], kc[h // group], vc[h // group], kpos, lim, p, window, scale, sc,
                  out[t, h * hd:(h + 1) * hd])


@njit(cache=True, fastmath=FM, parallel=True)
def attend_batch(q, kp, vp, li, seq, qpos, kpos, n_filled, scale, scores, out, window):
    """Batched decode: row t's query (q[t], at position qpos[t]) against the first n_filled[t] slots
    of sequence seq[t]'s cache in layer li of a KV pool, kp, vp (n_seq, n_layers, n_kv, cap,
    head_dim), kpos (n_seq, cap), into out (n, n_heads*head_dim). Every sequence's rows in one
    parallel region over (row, head) pairs, with attend_rows' masks (a wrapped ring's hidden
    slots, a sliding window > 0) and loops."""
    hd = kp.shape[4]
    n, n_heads = out.shape[0], out.shape[1] // hd
    group = n_heads // kp.shape[2]
    nw = scores.shape[0]
    total = n * n_heads
    nxt = np.zeros(1, np.int64)
    for w in prange(nw):
        sc = scores[w]
        while True:
            task = fetch_add(nxt, 0, 1)
            if task >= total:
                break
            t = task // n_heads
            h = task - t * n_heads
            si = seq[t]
            _head(q[t, h * hd:(h + 1) * hd], kp[si, li, h // group], vp[si, li, h // group], kpos[si], n_filled[t],
                  qpos[t], window, scale, sc, out[t, h * hd:(h + 1) * hd])
