"""Every kernel against gguf's numpy reference (dequantize) or a plain numpy formula."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from infer.kernels import blockir, ops, qmatmul as qm
from infer.kernels.attention import attend_one, attend_rows, masked_softmax

TYPES = {"F32": GT.F32, "F16": GT.F16, "BF16": GT.BF16, "Q8_0": GT.Q8_0}
PACK = {**TYPES, "Q4_1": GT.Q4_1}
SHAPES = [(1, 32), (5, 64), (7, 96), (13, 4096), (64, 576), (3, 11008)]


def nmse(a, ref):
    return float(np.mean((a - ref) ** 2) / np.mean(ref ** 2))


def pack(w: np.ndarray, tname: str, pad: int = 7):
    """Quantize w (rows, cols) with gguf's reference and lay it out as the runtime does: raw bytes
    at an offset inside a larger buffer. Returns (buf, tab, dequantized w, (d, m)): the block scales
    and Q4_1 mins as float64 (rows, nb), for the references of the int8 kernels."""
    gt = PACK[tname]
    if tname == "F32":
        raw = w.astype(np.float32).view(np.uint8)
    elif tname == "F16":
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = quants.quantize(w, gt)
    raw = np.ascontiguousarray(raw).reshape(w.shape[0], -1)
    off = 32 * pad   # keep 4-byte alignment for the F32 view
    buf = np.zeros(off + raw.nbytes + 64, np.uint8)
    buf[off:off + raw.nbytes] = raw.ravel()
    tab = np.zeros(qm.TAB_WIDTH, np.int64)
    tab[:4] = (off, int(gt), w.shape[0], w.shape[1])
    dm = (None, None)
    if tname.startswith("Q"):
        ts = raw.shape[1] // (w.shape[1] // 32)
        blocks = raw.reshape(w.shape[0], -1, ts)
        f16 = lambda at: np.ascontiguousarray(blocks[:, :, at:at + 2]).view(np.float16)[:, :, 0].astype(np.float64)  # noqa: E731
        dm = (f16(0), f16(2) if tname == "Q4_1" else None)
    ref = quants.dequantize(raw, gt).reshape(w.shape).astype(np.float32)
    return buf, tab, ref, dm


def kern(*type_ids):
    return qm.kernels(blockir.mask_of(type_ids))


def mv_float(buf, tabs, x, xsum, out, offs, chunk, starts, tmp):
    """The matvec group on float activations (its int8 inputs unused)."""
    ng = x.shape[0] // 32 + 1
    kern(*tabs[:, qm.TAB_TYPE]).mv(buf, tabs, x, xsum, out, offs, chunk, starts, tmp, np.zeros(x.shape[0], np.int8),
                                   np.zeros(blockir.LANES * ng, np.float32),
                                   np.zeros(blockir.XS_PER_GROUP * ng, np.float32), False)


@pytest.mark.parametrize("tname", list(TYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_and_matvec(tname, shape):
    """F32/F16/BF16 (and Q8_0 beside them: the block formats' own tests are test_formats.py) through
    the model's entry points, rows of any length."""
    rng = np.random.default_rng([list(TYPES).index(tname), *shape])
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    buf, tab, ref, dm = pack(w, tname)
    rows, cols = shape
    k = kern(int(tab[qm.TAB_TYPE]))
    tmp = np.zeros((8, cols), np.uint32)
    deq = np.zeros(shape, np.float32)
    k.dequant(buf, tab, 0, rows, deq, tmp[0])
    assert nmse(deq, ref) <= 1e-12
    deq2 = np.zeros(shape, np.float32)
    k.dequant_par(buf, tab, 0, rows, deq2, tmp)
    np.testing.assert_array_equal(deq, deq2)

    x = rng.standard_normal(cols).astype(np.float32)
    xsum = np.zeros(cols // 16 + 2, np.float32)
    blockir.half_sums(x, xsum)
    out = np.full(rows + 5, np.nan, np.float32)
    starts = np.zeros(4, np.int64)
    for chunk in (4, 8, 64):
        out[:] = np.nan
        mv_float(buf, tab.reshape(1, -1), x, xsum, out, np.array([5]), chunk, starts, tmp)
        want = ref.astype(np.float64) @ x
        assert nmse(out[5:], want) <= 5e-4 * 1e-3   # far tighter than the 5e-4
        assert np.isnan(out[:5]).all()              # nothing written outside the result


def test_matvec_group_several_tensors():
    rng = np.random.default_rng(1)
    cols = 128
    ws = [rng.standard_normal((r, cols)).astype(np.float32) for r in (12, 7, 9)]
    packs = [pack(w, t) for w, t in zip(ws, ("Q8_0", "F16", "Q4_1"))]
    # put the three tensors in one buffer
    buf = np.concatenate([p[0] for p in packs])
    tabs = np.stack([p[1] for p in packs])
    boff = 0
    for i, p in enumerate(packs):
        tabs[i, qm.TAB_OFF] += boff
        boff += p[0].size
    x = rng.standard_normal(cols).astype(np.float32)
    xsum = np.zeros(cols // 16, np.float32)
    blockir.half_sums(x, xsum)
    out = np.zeros(28, np.float32)
    mv_float(buf, tabs, x, xsum, out, np.array([0, 12, 19]), 4, np.zeros(4, np.int64),
             np.zeros((8, cols), np.uint32))
    want = np.concatenate([p[2] @ x for p in packs])
    assert nmse(out, want) < 1e-10


def test_rmsnorm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    out = np.zeros_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * w
    assert nmse(out, want) <= 1e-7


@pytest.mark.parametrize("mode", [ops.ROPE_NORM, ops.ROPE_NEOX])
def test_rope(mode):
    rng = np.random.default_rng(3)
    n, heads, hd = 4, 3, 64
    x = rng.standard_normal((n, heads * hd)).astype(np.float32)
    pos = np.array([0, 1, 17, 4000], np.int64)
    inv = np.zeros(hd // 2)
    ops.rope_inv_freq(hd, 10000.0, inv)
    got = x.copy()
    ops.rope(got, heads, hd, hd, pos, inv, mode)
    want = x.astype(np.float64).reshape(n, heads, hd).copy()
    theta = pos[:, None] * (10000.0 ** (-np.arange(0, hd, 2) / hd))[None, :]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if mode == ops.ROPE_NORM:
        a, b = want[..., 0::2].copy(), want[..., 1::2].copy()
        want[..., 0::2], want[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = want[..., :hd // 2].copy(), want[..., hd // 2:].copy()
        want[..., :hd // 2], want[..., hd // 2:] = a * c - b * s, a * s + b * c
    assert nmse(got, want.reshape(n, -1)) <= 1e-7


def test_silu_mul_and_softmax():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((2, 100)).astype(np.float32)
    u = rng.standard_normal((2, 100)).astype(np.float32)
    gu = np.concatenate([g, u], 1)
    g64 = g.astype(np.float64)
    for fn in (ops.silu_mul, ops.silu_mul_par):
        out = np.zeros_like(g)
        fn(gu, out)
        assert nmse(out, g64 / (1 + np.exp(-g64)) * u) <= 1e-7
        inplace = gu.copy()                     # into the gate half, the up half kept
        fn(inplace, inplace)
        assert nmse(inplace[:, :100], g64 / (1 + np.exp(-g64)) * u) <= 1e-7 and (inplace[:, 100:] == u).all()
    s = rng.standard_normal((2, 10)).astype(np.float32) * 5
    ref = s.astype(np.float64)[:, :7]
    ref = np.exp(ref - ref.max(1, keepdims=True)); ref /= ref.sum(1, keepdims=True)
    ops.softmax_rows(s, np.array([7, 7]))
    assert nmse(s[:, :7], ref) <= 1e-7 and (s[:, 7:] == 0).all()


def test_gelu_mul_tanh_form():
    """gelu (Gemma's FFN) against the tanh form in float64 (transformers' gelu_pytorch_tanh), over
    the whole range and both the serial and the parallel loop: relative error <= 1e-5 wherever the
    value is above 1e-6 in magnitude, absolute <= 1e-6 everywhere."""
    rng = np.random.default_rng(5)
    g = np.concatenate([np.linspace(-30, 30, 60000), rng.standard_normal(4000) * 4]).astype(np.float32).reshape(4, -1)
    u = rng.standard_normal(g.shape).astype(np.float32)
    x = g.astype(np.float64)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))) * u
    gu = np.concatenate([g, u], 1)
    for fn in (ops.gelu_mul, ops.gelu_mul_par):
        out = np.zeros_like(g)
        fn(gu, out)
        err = np.abs(out - ref)
        big = np.abs(ref) > 1e-6
        assert err.max() <= 1e-6 * max(1.0, np.abs(u).max()) * 30
        assert (err[big] / np.abs(ref[big])).max() <= 1e-5


def _attention_ref(q, k, v, qpos, kpos, scale, group, window=0):
    """q (n, H, d); k, v (Hkv, S, d) -> (n, H, d), causal by positions (and with a sliding
    window > 0, a query at p sees positions > p - window only: llama.cpp's and transformers')."""
    n, H, d = q.shape
    out = np.zeros((n, H, d))
    for t in range(n):
        for h in range(H):
            kv = h // group
            sc = (k[kv] @ q[t, h]) * scale
            sc[kpos > qpos[t]] = -np.inf
            if window:
                sc[kpos <= qpos[t] - window] = -np.inf
            p = np.exp(sc - sc.max()); p /= p.sum()
            out[t, h] = p @ v[kv]
    return out


@pytest.mark.parametrize("window", [0, 4])
def test_attention_decode_and_prefill(window):
    rng = np.random.default_rng(5)
    H, Hkv, d, S = 6, 2, 16, 12
    k = rng.standard_normal((Hkv, S, d)).astype(np.float32)
    v = rng.standard_normal((Hkv, S, d)).astype(np.float32)
    kpos = np.arange(S, dtype=np.int64)
    scale = np.float32(d ** -0.5)
    q = rng.standard_normal((1, H, d)).astype(np.float32)
    out = np.zeros(H * d, np.float32)
    attend_one(q.reshape(-1), k, v, 9, scale, H, Hkv, d, np.zeros((H, S), np.float32), out, kpos,
               8 - window + 1 if window else 0)
    want = _attention_ref(q.astype(np.float64), k[:, :9].astype(np.float64), v[:, :9].astype(np.float64),
                          np.array([8]), kpos[:9], scale, H // Hkv, window)
    assert nmse(out, want.reshape(-1)) <= 1e-7
    # prefill scores of 3 queries at positions 5..7 over 8 slots, one kv head, group 3
    n, group = 3, 3
    qs = rng.standard_normal((n * group, d)).astype(np.float32)
    s = (qs @ k[0, :8].T).astype(np.float32)
    masked_softmax(s, np.array([5, 6, 7]), group, kpos, 8, scale, window)
    o = s @ v[0, :8]
    want = _attention_ref(qs.reshape(n, group, d).astype(np.float64), k[:1, :8].astype(np.float64),
                          v[:1, :8].astype(np.float64), np.array([5, 6, 7]), kpos[:8], scale, group, window)
    assert nmse(o, want.reshape(n * group, d)) <= 1e-7


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("n,start,workers,ring", [(1, 0, 1, False), (7, 0, 2, False), (5, 9, 3, False),
                                                   (6, 4, 2, True)])
def test_attention_prefill_rows(n, start, workers, ring, window):
    """attend_rows: a chunk of n queries at positions start.. against the cache, causal by slot
    position; `ring`: the slots hold positions out of order (a wrapped ring buffer), with some
    past every query (hidden in the middle) and some unfilled slots after n_filled."""
    rng = np.random.default_rng(n + start)
    H, Hkv, d, S = 6, 2, 16, 24
    k = rng.standard_normal((Hkv, S, d)).astype(np.float32)
    v = rng.standard_normal((Hkv, S, d)).astype(np.float32)
    n_filled = start + n
    kpos = np.full(S, 10 ** 9, np.int64)
    kpos[:n_filled] = np.arange(n_filled)
    qpos = np.arange(start, start + n, dtype=np.int64)
    if ring:            # slots in rotated order; positions beyond the chunk's queries in between
        n_filled = start + n + 3
        kpos[:n_filled] = np.roll(np.arange(n_filled), 4)
    qkv = rng.standard_normal((n, H * d + 2 * Hkv * d)).astype(np.float32)   # queries first in each row
    q = qkv[:, :H * d].reshape(n, H, d)
    out = np.full((n, H * d), np.nan, np.float32)
    attend_rows(qkv, k, v, qpos, kpos, n_filled, np.float32(d ** -0.5),
                np.full((workers, S), np.nan, np.float32), out, window)
    want = _attention_ref(q.astype(np.float64), k[:, :n_filled].astype(np.float64),
                          v[:, :n_filled].astype(np.float64), qpos, kpos[:n_filled], np.float32(d ** -0.5), H // Hkv,
                          window)
    assert nmse(out.reshape(n, H, d), want) <= 1e-7
