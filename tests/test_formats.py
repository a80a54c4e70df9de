"""Every block format of quant/formats (issue 14): its numpy codec and every kernel generated from
it (dequantization, decode matvec on float and on int8 activations, the prompt's int8 matmul)
against gguf.quants.dequantize, ggml's reference ported to numpy, on random blocks and edge
cases: zero blocks, max-magnitude scales (+-65504), negative scales, all-ones quant bits."""
from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest

from infer.kernels import blockir, qmatmul as qm
from infer.quant.formats import FORMATS

NAMES = [f.name for f in FORMATS.values()]
BY_NAME = {f.name: f for f in FORMATS.values()}


def blocks(f, n, rng, edge=True):
    """n blocks of format f: random bytes with finite random f16 fields; with edge, the first
    rows of blocks_per_row are the edge cases (see the module docstring)."""
    raw = rng.integers(0, 256, (n, f.size), dtype=np.uint8)
    for k in f.f16_at:
        raw[:, k:k + 2] = (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def edge_rows(f, raw, per_row):
    """Rows 0-3 (per_row blocks each): zero, max-magnitude scales, negative scales, quant bytes 0xFF."""
    quant = np.ones(f.size, bool)
    for k in f.f16_at:
        quant[k:k + 2] = False
    raw[0:per_row] = 0
    for i, k in enumerate(f.f16_at):
        raw[per_row:2 * per_row, k:k + 2] = np.array([65504.0 if i == 0 else -65504.0], np.float16).view(np.uint8)
        v = raw[2 * per_row:3 * per_row, k:k + 2].copy().view(np.float16)
        raw[2 * per_row:3 * per_row, k:k + 2] = (-np.abs(v)).view(np.uint8)
    raw[3 * per_row:4 * per_row][:, quant] = 0xFF
    return raw


def ref_of(f, raw):
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(f.id)).reshape(raw.shape[0], -1).astype(np.float64)


@pytest.mark.parametrize("name", NAMES)
def test_codec_matches_gguf(name):
    """The format's numpy codec (its unpack run on numpy arrays) == gguf.quants, bit for bit."""
    f = BY_NAME[name]
    rng = np.random.default_rng([1, f.id])
    raw = edge_rows(f, blocks(f, 400, rng), 10)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(f.id)).reshape(raw.shape[0], -1)
    np.testing.assert_array_equal(f.dequantize(raw), want)


def i8_expected(f, raw_rows, xq, xd, x):
    """What the int8 kernels compute, in float64, from the format's groups: per lane of 4 values
    s * d_x * (sum q xq - K sum xq), K the offset (or the centre of a format with mins), plus
    (m + centre s) times the lanes' exact sums of x."""
    rows, per = raw_rows.shape[0], raw_rows.shape[1] // f.size
    groups = f.unpack_np(raw_rows.reshape(-1, f.size))                   # per group j: (rows*per,)
    ng = per * f.groups
    xq = xq.astype(np.int64).reshape(ng, 8, 4)
    xd = xd[:ng * 8].astype(np.float64).reshape(ng, 8)
    xl = x.astype(np.float64).reshape(ng, 8, 4).sum(2)
    k = f.centre if f.has_min else f.offset
    out = np.zeros(rows)
    for j, g in enumerate(groups):
        q = g.q.reshape(rows, per, 8, 4)
        gi = np.arange(per) * f.groups + j                       # the group's index along the row
        dot = (q * xq[gi][None]).sum(3) - k * xq[gi].sum(2)[None]          # (rows, per, 8)
        half = [0] * 4 + [1] * 4 if len(g.s) == 2 else [0] * 8
        s = np.stack([g.s[h].astype(np.float64).reshape(rows, per) for h in half], 2)
        out += (s * xd[gi][None] * dot).sum((1, 2))
        if g.m is not None:
            mm = np.stack([(g.m[h].astype(np.float64) + f.centre * g.s[h].astype(np.float64)).reshape(rows, per)
                           for h in half], 2)
            out += (mm * xl[gi][None]).sum((1, 2))
    return out


def k_expected(f, raw_rows, xq, xs, x):
    """What the 256-value formats' int8 decode kernels compute (llama.cpp's Q8_K form,
    blockir.quantize_xk: one scale per 256 values in xs, int8 values in xq[n:]), in float64, from
    the format's integer scales (KScales) and groups."""
    from infer.quant.formats.base import NumpyEmit
    rows, n = raw_rows.shape[0], x.shape[0]
    blk = raw_rows.reshape(-1, f.size)
    ks = f.kscales(NumpyEmit(blk))
    groups = f.unpack_np(blk)
    nb = n // 256
    xk = xq[n:].astype(np.int64).reshape(nb, 16, 16)
    dk = xs[6 * (n // 32):6 * (n // 32) + nb].astype(np.float64)
    q = np.stack([g.q for g in groups], 1).reshape(rows, nb, 16, 16)           # (rows, blocks, halves, 16)
    sc = ks.sc.reshape(rows, nb, 16)
    isum = (sc * ((q - f.offset) * xk[None]).sum(3)).sum(2)                     # (rows, blocks)
    out = ks.d.astype(np.float64).reshape(rows, nb) * dk[None] * isum
    if ks.m is not None:
        out += ks.dm.astype(np.float64).reshape(rows, nb) * dk[None] * (ks.m.reshape(rows, nb, 16) * xk.sum(2)[None]).sum(2)
    return out.sum(1)


def prompt_buffers(n, cols):
    """The prompt matmul's int8 activations and terms for n tokens (blockir.quantize_rows's and
    quantize_rows_k's layouts); 127 / NaN where nothing is written, so that a kernel storing a
    ragged group's padding shows."""
    g = (n + 7) // 8
    return (np.full((g, cols // 32, 8, 32), 127, np.int8),
            np.full((g, cols // 32, blockir.XG_FIELDS, 8), np.nan, np.float32),
            np.full(g * 8 * cols, 127, np.int8),
            np.full(g * max(1, cols // 256) * blockir.KF_CELL, np.nan, np.float32))


def k_token(xk, xkf, t, cols):
    """Token t's values and scales from quantize_rows_k's buffers (int8 q with a multiplier m per
    16 values, one d per block), laid out as quantize_xk's for one token (xq[n:] as q m, and xs),
    for k_expected."""
    nb = cols // 256
    g, tl = t // 8, t % 8
    cells = g * nb + np.arange(nb)
    cf = xkf.reshape(-1, blockir.KF_CELL)[cells]
    m = np.zeros((nb, 16), np.int64)
    m[:, blockir.K_HALF_OF] = cf[:, blockir.KF_M:].view(np.int16).reshape(nb, 8, 16)[:, tl]
    pos = np.array([blockir._kpos(i) for i in range(256)])
    q = xk.reshape(-1, 8, 256)[cells, tl][:, pos].astype(np.int64).reshape(nb, 16, 16) * m[:, :, None]
    xs = np.zeros(8 * (cols // 32), np.float32)
    xs[6 * (cols // 32):6 * (cols // 32) + nb] = cf[:, tl]
    return np.concatenate([np.zeros(cols, np.int64), q.reshape(-1)]), xs


def prompt_token(hq, xg, t, n):
    """Token t's int8 values (column order) and scales per column quad (8 per group of 32) from the
    32-value formats' prompt buffers of an n-row pass: quantize_rows's layout (a scale per quad), or
    quantize_rows_tl's where blockir.token_lanes(n) (VNNI: a scale per blockir.TL_SUB values, the
    tokens in the lanes)."""
    g, tl = t // 8, t % 8
    if blockir.token_lanes(n):
        ng, nb = hq.shape[0], hq.shape[1]
        xt = hq.reshape(ng, nb, 8, 8, 4)
        xf = xg.reshape(-1)[:ng * nb * blockir.TL_FIELDS * 8].reshape(ng, nb, blockir.TL_FIELDS, 8)
        q = xt[g, :, :, tl, :].reshape(-1)
        sh = xf.view(np.int32)[g, :, blockir.TL_S0:blockir.TL_S0 + 8, tl]
        d = (xf[g, :, blockir.TL_D, tl][:, None] * sh.astype(np.float32)).reshape(-1)
        return q, d
    return hq[g, :, tl].reshape(-1), xg[g, :, blockir.XG_L + tl].reshape(-1)


def layout(raw, rows, pad=64):
    buf = np.zeros(pad + raw.nbytes + 64, np.uint8)
    buf[pad:pad + raw.nbytes] = raw.ravel()
    return buf, pad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows,per_row", [(13, 1), (6, 24)])
def test_kernels(name, rows, per_row):
    """Decode (float and int8 activations), prefill (int8, ragged token groups) and dequantization
    of one format, on rows short enough to run two per pass (per_row 1) and long ones (24 blocks:
    4-row passes for the float kernels of 32-value formats)."""
    f = BY_NAME[name]
    if f.block == 32:
        per_row *= 8                                    # 8 or 192 blocks of 32
    rng = np.random.default_rng([2, f.id, rows, per_row])
    raw = edge_rows(f, blocks(f, rows * per_row, rng), per_row).reshape(rows, -1)
    cols = per_row * f.block
    ref = ref_of(f, raw.reshape(-1, f.size)).reshape(rows, cols)
    buf, off = layout(raw, rows)
    tab = np.array([off, f.id, rows, cols], np.int64)
    k = qm.kernels(blockir.mask_of([f.id]))
    tmp = np.zeros((8, cols), np.uint32)

    deq = np.full((rows, cols), np.nan, np.float32)
    k.dequant(buf, tab, 0, rows, deq, tmp[0])
    np.testing.assert_array_equal(deq, ref.astype(np.float32))
    deq2 = np.zeros((rows, cols), np.float32)
    k.dequant_par(buf, tab, 0, rows, deq2, tmp)
    np.testing.assert_array_equal(deq2, deq)

    x = rng.standard_normal(cols).astype(np.float32)
    x[5] = 9.0                                          # an outlier channel
    ng = cols // 32 + 1
    xsum, xq = np.zeros(2 * ng, np.float32), np.zeros(2 * cols, np.int8)
    xd, xs = np.zeros(8 * ng, np.float32), np.zeros(blockir.XS_PER_GROUP * ng, np.float32)
    scale = np.abs(ref) @ np.abs(x.astype(np.float64)) + 1e-30          # per row
    for chunk in (4, 8, 64):
        out = np.full(rows + 3, np.nan, np.float32)
        k.mv(buf, tab.reshape(1, -1), x, xsum, out, np.array([3]), chunk, np.zeros(4, np.int64), tmp,
             xq, xd, xs, False)
        assert np.isnan(out[:3]).all()
        assert (np.abs(out[3:] - ref @ x) <= 1e-6 * scale).all()
    out = np.full(rows, np.nan, np.float32)
    k.mv(buf, tab.reshape(1, -1), x, xsum, out, np.array([0]), 8, np.zeros(4, np.int64), tmp, xq, xd, xs, True)
    want = k_expected(f, raw, xq, xs, x) if f.kscales is not None else i8_expected(f, raw, xq[:cols], xd, x)
    assert (np.abs(out - want) <= 1e-6 * scale).all()
    # and near the float result: the int8 rounding of x is the whole difference
    assert (np.abs(out - ref @ x) <= (4e-2 if f.kscales is not None else 2e-2) * scale).all()

    # the prompt's matmul against the one-token expectation: 19 tokens (groups of 8, 8, 3: column
    # slices on the long rows), and passes of 1, 2, 4 and 5 (whole rows up to blockir.SHORT_PASS;
    # the token spans 0-1, 2-3, 4-7 of blockir._SPANS each run or skipped)
    for n in (19, 1, 2, 4, 5):
        h = rng.standard_normal((n, cols)).astype(np.float32)
        h[:, 5] = 9.0
        hq, xg, xk, xkf = prompt_buffers(n, cols)
        blockir.quantize_prompt(h, hq, xg, False)
        if f.kscales is not None:
            blockir.quantize_rows_k(h, xk, xkf, False)
        mm = np.full((n, rows), np.nan, np.float32)
        k.matmul_i8(buf, tab.reshape(1, -1), hq, xg, xk, xkf, mm, 2, np.zeros(2, np.int64))
        for t in range(n):
            if f.kscales is not None:
                want = k_expected(f, raw, *k_token(xk, xkf, t, cols), h[t])
            else:
                qt, xdt = prompt_token(hq, xg, t, n)
                want = i8_expected(f, raw, qt, xdt, h[t])
            sc = np.abs(ref) @ np.abs(h[t].astype(np.float64)) + 1e-30
            assert (np.abs(mm[t] - want) <= 1e-5 * sc).all(), (n, t)


def test_mixed_formats_in_one_group():
    """One matvec group and one prompt matmul over matrices of different formats (a Q4_K_M
    file's layers mix Q4_K, Q6_K and Q5_0/Q8_0), dispatched per matrix."""
    names = ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]
    rng = np.random.default_rng(3)
    cols = 512
    raws, refs, tabs, parts, pos = [], [], [], [], 64
    for i, nm in enumerate(names):
        f = BY_NAME[nm]
        r = 5 + i
        raw = blocks(f, r * cols // f.block, rng).reshape(r, -1)
        refs.append(ref_of(f, raw.reshape(-1, f.size)).reshape(r, cols))
        tabs.append([pos, f.id, r, cols])
        parts.append(raw.ravel())
        pos += raw.nbytes
    buf = np.concatenate([np.zeros(64, np.uint8), *parts, np.zeros(64, np.uint8)])
    tabs = np.array(tabs, np.int64)
    k = qm.kernels(blockir.mask_of(tabs[:, 1]))
    ref = np.concatenate(refs)
    x = rng.standard_normal(cols).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(tabs[:, 2])[:-1]])
    out = np.zeros(ref.shape[0], np.float32)
    z = lambda n, dt=np.float32: np.zeros(n, dt)  # noqa: E731
    for use_i8 in (False, True):
        k.mv(buf, tabs, x, z(cols // 16 + 2), out, offs, 4, z(8, np.int64), np.zeros((8, cols), np.uint32),
             z(2 * cols, np.int8), z(cols // 4 + 8), z(cols // 4 + 8), use_i8)
        np.testing.assert_allclose(out, ref @ x, rtol=0, atol=(4e-2 if use_i8 else 1e-6) * np.abs(ref).sum(1).max() * 3)
    n = 10
    h = rng.standard_normal((n, cols)).astype(np.float32)
    hq, xg, xk, xkf = prompt_buffers(n, cols)
    blockir.quantize_prompt(h, hq, xg, False)
    blockir.quantize_rows_k(h, xk, xkf, False)
    mm = np.zeros((n, ref.shape[0]), np.float32)
    k.matmul_i8(buf, tabs, hq, xg, xk, xkf, mm, 2, np.zeros(len(names) + 1, np.int64))
    np.testing.assert_allclose(mm, h @ ref.T, rtol=0, atol=4e-2 * np.abs(ref).sum(1).max() * 3)


@pytest.mark.parametrize("resid", [False, True])
def test_k_prompt_activations_scale_per_16(resid):
    """quantize_rows_k gives each 16 values their own step, d m_h with m_h = ceil(16 amax_h /
    amax): a heavy-tailed row (an outlier 60x the rest in each block, as the FFN down projection's
    input has) keeps its small values' precision; llama.cpp's Q8_K (one step amax/127 per 256)
    rounded them to 0 or 1 step and cost Gemma 3 270M a top-32 KL of 0.004 (tests/test_gemma3_real.py).
    With resid the last row is also the sum of its two parts."""
    n, cols = 11, 768
    rng = np.random.default_rng(7)
    h = rng.standard_normal((n, cols)).astype(np.float32)
    h[:, ::256] *= 60.0
    h[3, 256:512] = 0.0                                 # an all-zero block
    h[4, :16] = -1e-3                                   # a tiny first half beside the outlier's
    _, _, xk, xkf = prompt_buffers(n + 1, cols)
    blockir.quantize_rows_k(h, xk, xkf, resid)
    nb = cols // 256
    for t in range(n + (1 if resid else 0)):
        q, xs = k_token(xk, xkf, t, cols)
        d = np.repeat(xs[6 * (cols // 32):6 * (cols // 32) + nb].astype(np.float64), 256)
        xhat = q[cols:] * d
        src = h[t] if t < n else h[n - 1] - prev
        blk = np.abs(src.astype(np.float64)).reshape(nb, 16, 16)
        amax = blk.max((1, 2), keepdims=True)
        m = np.where(amax > 0, np.clip(np.ceil(16 * blk.max(2, keepdims=True) / np.where(amax > 0, amax, 1)), 1, 16), 1)
        step = (amax / (127 * 16) * m * np.ones((1, 1, 16))).reshape(-1)
        assert (np.abs(xhat - src) <= step / 2 * (1 + 1e-5) + 1e-12).all(), t
        assert np.abs(q[cols:]).max() <= 127 * 16
        if t == n - 1:
            prev = xhat
    if resid:           # the residual row carries what row n - 1 missed: together nearly exact
        qa, xa = k_token(xk, xkf, n - 1, cols)
        qb, xb = k_token(xk, xkf, n, cols)
        both = sum(q[cols:] * np.repeat(x[6 * (cols // 32):6 * (cols // 32) + nb].astype(np.float64), 256)
                   for q, x in ((qa, xa), (qb, xb)))
        assert np.abs(both - h[n - 1]).max() <= 1e-4 * np.abs(h[n - 1]).max()
