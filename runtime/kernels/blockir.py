"""Kernels for every block format of quant/formats, generated from the formats' definitions.

A format states how one block unpacks into groups of 32 columns (`Group(q, s, m)`: 32 integer
values as bytes, scales and mins per group or per half of 16; see quant/formats/base.py). The
kernels here are written once over that description:

  mv_float   decode, float activations (the exact path; every CPU): per group the 32 q as floats
             times x, scaled once per group or half; offsets and mins on per-16 sums of x (xs2).
  mv_i8      decode, int8 activations (quantize_x: a scale per 4 values): per group one u8 x s8
             dot product (vpmaddubsw + vpmaddwd on AVX2: pairs of i16, then 8 lanes of i32, each
             the sum of 4 products), the offset subtracted from the lanes as an integer, one
             multiply by the group's scale and the lanes' x scales, one fma; mins on x's exact
             per-lane sums (a vector fma).
  mm_i8      prefill: a row's blocks unpacked once and multiplied with up to MAXT tokens.
  mm_i8_tl   prefill of the 32-value formats on VNNI CPUs (blockir.token_lanes):
             the MAXT tokens in the vector lanes, TL_ROWS rows per pass, a scale per TL_SUB values.
  dequant    rows to float32 (BLAS tiles, embeddings).

Each sits behind a dispatcher on the GGUF type id (`*_any`): a `switch` whose cases are the
formats' kernels, each specialised for its format. Its first argument, `mask`, says which formats
the switch holds: the drivers pass it down, and the entry points (qmatmul.kernels(mask),
models' decode steps) hold it as a compile-time constant, so that a model compiles the kernels of
its own types only (all twelve formats' prefill and decode kernels take minutes to compile). Signed formats (Q8_0, IQ4) move the weights' signs onto the
activations (vpsignb) and multiply |q|; unsigned ones subtract `offset` (Q4_0's 8) or `centre`
(formats with mins; the min gets centre * s back on x's exact sums) from the integer dot products.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from infer.quant.formats import FORMATS
from infer.quant.formats.base import Lane

from . import simd
from .isa import FM
from .simd import (F32, I8, I16, I32, I64, MAXR, MAXT, PF_DIST, SHORT_ROW, V8F, V8I, V16S, V32B, ZERO8,
                   _bcast, _blk_f16, _decl, _dot_u8s8, _dpbusd, _dpwssd, _hsum, _hsum2, _hsum8, _pmaddubsw, _pmaddwd, _prefetch, _psign,
                   _row_switch, _vfma, _vload, _xvec)

TARGET = simd.TARGET
# int8 activations carry one scale per 4 values (LANES per group of 32), not one per group: the
# int32 lanes of vpmaddwd each sum 4 products, so a lane's scale costs a vector multiply where a
# group's was a broadcast. LLM activations have outlier channels: in SmolLM2's attention and FFN
# inputs most groups of 32 hold one value carrying nearly all of the group (max/rms 5.6 of at most
# sqrt(32) = 5.66), and one scale per group gave the other 31 values a step of outlier/127 (the
# logits moved by 1-5, flipping near ties such as the first token of a chat reply; llama.cpp, one
# scale per block, shows the same). Per 4 values only the outlier's own lane is coarse.
LANES = 8
XS_PER_GROUP = 8          # quantize_x's xs: sums of xhat and of x per 16 and per 32 values, then quantize_xk's
XS2_PER_GROUP = 2         # the float kernels' sums of x per 16 values
# quantize_rows's xg fields per token group and group of 32: vectors of the MAXT tokens' sum(xhat)
# and sum(x) over the group and over each half, then each token's LANES scales (field XG_L + t)
XG_SH, XG_S, XG_SH0, XG_SH1, XG_S0, XG_S1, XG_L = range(7)
XG_FIELDS = XG_L + MAXT
PAIR_BYTES = 512          # int8 decode: rows of at most this many bytes go two per pass

V4I = ir.VectorType(I32, 4)
V16B = ir.VectorType(I8, 16)


def _c(v):
    return ir.Constant(I64, v)


def _c32(v):
    return ir.Constant(I32, v)


class Emit:
    """The operations a format's unpack(e) builds a block's groups with; offsets are bytes from
    the block's start; scalars are i32 (integers) or float (scales)."""

    def __init__(self, builder, wp, boff, size):
        self.b, self.wp, self.boff, self.size = builder, wp, boff, size

    def _at(self, k):
        return self.b.add(self.boff, _c(k))

    def load(self, k, n):
        """<n x i8> at byte k (unaligned)."""
        return _vload(self.b, self.wp, self._at(k), ir.VectorType(I8, n))

    def f16(self, k):
        """The f16 at byte k as float32 (simd._blk_f16 reads 4 bytes: near the block's end it
        reads the 4 ending at k + 2 and takes their upper half, never a byte past the block)."""
        if k + 4 <= self.size:
            return _blk_f16(self.b, self.wp, self._at(k))
        return _blk_f16(self.b, self.wp, self._at(k - 2), lane=1)

    def u8(self, k):
        return self.b.zext(self.b.load(self.b.gep(self.wp, [self._at(k)])), I32)

    def i8(self, k):
        return self.b.sext(self.b.load(self.b.gep(self.wp, [self._at(k)])), I32)

    def u16(self, k):
        p = self.b.bitcast(self.b.gep(self.wp, [self._at(k)]), I16.as_pointer())
        return self.b.zext(self.b.load(p, align=1), I32)

    def u32(self, k):
        p = self.b.bitcast(self.b.gep(self.wp, [self._at(k)]), I32.as_pointer())
        return self.b.load(p, align=1)

    def words8(self, lo, hi):
        """<8 x i32>: the 8 bytes of two i32 scalars (lo's first, little-endian), zero-extended (byte
        fields computed four at a time with scalar ops, then one vector shuffle)."""
        v = self.b.insert_element(ir.Constant(V4I, ir.Undefined), lo, _c32(0))
        v = self.b.bitcast(self.b.insert_element(v, hi, _c32(1)), V16B)
        return self.b.zext(self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), list(range(8)))), V8I)

    def _i(self, v):
        return _c32(v) if isinstance(v, int) else v

    def and_(self, a, b):
        return self.b.and_(self._i(a), self._i(b))

    def or_(self, a, b):
        return self.b.or_(self._i(a), self._i(b))

    def shr(self, a, n):
        return a if n == 0 else self.b.lshr(a, self._i(n))

    def shl(self, a, n):
        return a if n == 0 else self.b.shl(a, self._i(n))

    def sub(self, a, b):
        return self.b.sub(self._i(a), self._i(b))

    def itof(self, a):
        return self.b.sitofp(a, F32)

    def fmul(self, a, b):
        return self.b.fmul(a, b)

    def fneg(self, a):
        return self.b.fneg(a)

    # <32 x i8> (or <16 x i8>) vectors of unsigned bytes
    def _splat(self, v, n=32):
        return ir.Constant(ir.VectorType(I8, n), [v] * n)

    def vand(self, v, m):
        return self.b.and_(v, self._splat(m, v.type.count))

    def vor(self, a, b):
        return self.b.or_(a, b)

    def vshr(self, v, n):
        return v if n == 0 else self.b.lshr(v, self._splat(n, v.type.count))

    def vshl(self, v, n):
        return v if n == 0 else self.b.shl(v, self._splat(n, v.type.count))

    def nibbles16(self, k):
        """The 16 bytes at k as 32 values: low nibbles (columns 0-15), then high ones (16-31)."""
        q = self.load(k, 16)
        lo = self.b.and_(q, self._splat(15, 16))
        hi = self.b.lshr(q, self._splat(4, 16))
        return self.b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))

    def bitplane(self, src, idx, mask, val):
        """<32 x i8>: val where src[idx[c]] & mask[c] is set, else 0 (src: <n x i8>)."""
        if (TARGET.x86 and src.type.count == 4 and list(idx) == [c // 8 for c in range(32)]
                and list(mask) == [1 << (c % 8) for c in range(32)]):
            # bit c of a 32-bit word: the word as a mask register (kmovd), one masked move
            bits = self.b.bitcast(self.b.bitcast(src, I32), ir.VectorType(ir.IntType(1), 32))
            return self.b.select(bits, self._splat(val), self._splat(0))
        v = src if list(idx) == list(range(32)) else \
            self.b.shuffle_vector(src, src, ir.Constant(ir.VectorType(I32, 32), list(idx)))
        m = ir.Constant(V32B, list(mask))
        hit = self.b.icmp_unsigned("!=", self.b.and_(v, m), self._splat(0))
        return self.b.select(hit, self._splat(val), self._splat(0))

    # <8 x i32> vectors (a block's 8 or 16 scales at once) and <8 x float>
    def bytes8(self, k, idx, signed=False):
        """<8 x i32>: the bytes at k + idx[i] (zero- or sign-extended); one 16-byte load, placed
        so that it stays inside the block."""
        base = min(k, self.size - 16)
        v = self.load(base, 16)
        v = self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), [i + k - base for i in idx]))
        return self.b.sext(v, V8I) if signed else self.b.zext(v, V8I)

    def splat8(self, a):
        v = self.b.insert_element(ir.Constant(V8I, ir.Undefined), a, _c32(0))
        return self.b.shuffle_vector(v, v, ir.Constant(V8I, [0] * 8))

    def _v8(self, c):
        return ir.Constant(V8I, list(c)) if isinstance(c, (list, tuple)) else (ir.Constant(V8I, [c] * 8) if isinstance(c, int) else c)

    def and8(self, a, c):
        return self.b.and_(a, self._v8(c))

    def or8(self, a, b):
        return self.b.or_(a, self._v8(b))

    def shr8(self, a, c):
        return self.b.lshr(a, self._v8(c))

    def shl8(self, a, c):
        return self.b.shl(a, self._v8(c))

    def sub8(self, a, c):
        return self.b.sub(a, self._v8(c))

    def tof8(self, a, scale):
        """<8 x float>: float(a) * scale (a float scalar)."""
        return self.b.fmul(self.b.sitofp(a, V8F), _bcast(self.b, scale))

    def lane(self, vf, i):
        """Element i of an <8 x float> as a group's scale or min (the kernels broadcast it with
        one shuffle)."""
        return Lane(vf, i)

    def pairs16(self, v):
        """<16 x i16> [v0, v0, v1, v1, ...] of an <8 x i32> (per-group values, per half)."""
        t = self.b.trunc(v, ir.VectorType(I16, 8))
        return self.b.shuffle_vector(t, t, ir.Constant(ir.VectorType(I32, 16), [i // 2 for i in range(16)]))

    def cat16(self, a, b):
        """<16 x i16> of two <8 x i32> (per-half values: halves 0-7, 8-15)."""
        ta, tb = (self.b.trunc(v, ir.VectorType(I16, 8)) for v in (a, b))
        return self.b.shuffle_vector(ta, tb, ir.Constant(ir.VectorType(I32, 16), list(range(16))))

    def lookup16(self, idx, table):
        """<32 x i8> table[idx[c]] for indices 0..15 (vpshufb with AVX2, else selects)."""
        if TARGET.avx2:
            t = ir.Constant(V32B, [v & 255 for v in table] * 2)
            f = _decl(self.b, "llvm.x86.avx2.pshuf.b", V32B, [V32B, V32B])
            return self.b.call(f, [t, idx])
        out = self._splat(table[0] & 255)
        for i in range(1, 16):
            out = self.b.select(self.b.icmp_unsigned("==", idx, self._splat(i)), self._splat(table[i] & 255), out)
        return out


def _floats(builder, fmt, q, j):
    """Columns 8j..8j+7 of a group's q as <8 x float>."""
    part = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, 8), list(range(8 * j, 8 * j + 8))))
    return builder.sitofp(builder.sext(part, V8I) if fmt.signed else builder.zext(part, V8I), V8F)


def _bc(builder, v):
    """A scale (float scalar or Lane) broadcast to <8 x float>."""
    if isinstance(v, Lane):
        return builder.shuffle_vector(v.vec, v.vec, ir.Constant(V8I, [v.i] * 8))
    return _bcast(builder, v)


def _scalar(builder, v):
    return builder.extract_element(v.vec, _c32(v.i)) if isinstance(v, Lane) else v


def _fop(builder, fn, a, b):
    """fn(a, b) on scales: scalars, or Lanes of the same index (computed on the whole vectors:
    the same vector op for every group of a block, which LLVM computes once), or a Lane and a
    float constant."""
    if isinstance(a, Lane) or isinstance(b, Lane):
        i = a.i if isinstance(a, Lane) else b.i
        # one vector op per pair of operands (memo on the builder): the groups' Lanes of the
        # result then share its vector (blockir's per-block terms look for that)
        memo = builder.__dict__.setdefault("_fop_memo", {})
        key = (fn.__name__, id(a.vec) if isinstance(a, Lane) else str(a), id(b.vec) if isinstance(b, Lane) else str(b))
        if key not in memo:
            va = a.vec if isinstance(a, Lane) else _bcast(builder, a)
            vb = b.vec if isinstance(b, Lane) else _bcast(builder, b)
            memo[key] = (fn(va, vb), a, b)            # a, b kept: their ids stay theirs
        return Lane(memo[key][0], i)
    return fn(a, b)


def _lanes(builder, vals):
    """<8 x float> of per-group (one value) or per-half (two: lanes 0-3, 4-7) values."""
    if len(vals) == 1:
        return _bc(builder, vals[0])
    a, b = vals
    if isinstance(a, Lane) and isinstance(b, Lane) and a.vec is b.vec:
        return builder.shuffle_vector(a.vec, a.vec, ir.Constant(V8I, [a.i] * 4 + [b.i] * 4))
    return builder.shuffle_vector(_bc(builder, a), _bc(builder, b), ir.Constant(V8I, [0, 1, 2, 3, 12, 13, 14, 15]))


def _shift_of(k):
    assert k & (k - 1) == 0, "offsets and centres are powers of two"
    return k.bit_length() - 1


def _ioff(fmt):
    """The integer the int8 kernels subtract from q: the offset, or the centre of a format with mins."""
    return fmt.centre if fmt.has_min else fmt.offset


def _mins(builder, fmt, g):
    """Per half: the coefficient of sum(x) in the int8 kernels: m + centre * s (formats with
    mins), -offset * s (float kernels use this via _fmins)."""
    if fmt.has_min:
        if fmt.centre:
            c = ir.Constant(F32, float(fmt.centre))
            cs = [_fop(builder, builder.fmul, c, s) for s in g.s]
            return [_fop(builder, builder.fadd, m, v) for m, v in zip(g.m, cs)]
        return list(g.m)
    return None


def _fmins(builder, fmt, g):
    """Per half: the coefficient of sum(x) in the float kernels: m - offset * s, or None."""
    if fmt.has_min:
        return list(g.m)
    if fmt.offset:
        c = ir.Constant(F32, -float(fmt.offset))
        return [_fop(builder, builder.fmul, c, s) for s in g.s]
    return None


# --- decode on float activations ----------------------------------------------------------------

def _cg_mv_float(fmt, builder, w_p, woff, rstride, nb, xp, xs2p, outp, o0, nrows):
    """out[o0 + r] = row r . x for r < nrows (1..MAXR rows, rstride bytes apart, from byte woff),
    nb blocks a row; xs2p: sums of x per 16 columns."""
    G = fmt.groups
    most = MAXR if G == 1 else 1
    accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(most)]
    offs = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(most)]
    cases, end = _row_switch(builder, nrows, most)
    for bb, nr in cases:
        with builder.goto_block(bb):
            if nr not in (1, most):         # the driver passes 1 or MAXR (compile time)
                builder.branch(end)
                continue
            for r in range(nr):
                builder.store(ZERO8, accs[r])
                builder.store(ir.Constant(F32, 0.0), offs[r])
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                for r in range(nr):
                    boff = builder.add(builder.add(woff, builder.mul(_c(r), rstride)), builder.mul(b, _c(fmt.size)))
                    groups = fmt.unpack(Emit(builder, w_p, boff, fmt.size))
                    for gi, g in enumerate(groups):
                        col = builder.add(builder.mul(b, _c(fmt.block)), _c(32 * gi))
                        xv = [_xvec(builder, xp, builder.add(col, _c(8 * j))) for j in range(4)]
                        qf = [_floats(builder, fmt, g.q, j) for j in range(4)]
                        acc = builder.load(accs[r])
                        if len(g.s) == 1:
                            t = builder.fmul(qf[0], xv[0])
                            for j in range(1, 4):
                                t = _vfma(builder, qf[j], xv[j], t)
                            acc = _vfma(builder, _bc(builder, g.s[0]), t, acc)
                        else:
                            for h in range(2):
                                t = _vfma(builder, qf[2 * h + 1], xv[2 * h + 1], builder.fmul(qf[2 * h], xv[2 * h]))
                                acc = _vfma(builder, _bc(builder, g.s[h]), t, acc)
                        builder.store(acc, accs[r])
                        fm = _fmins(builder, fmt, g)
                        if fm is not None:
                            fm = [_scalar(builder, v) for v in fm]
                            gidx = builder.add(builder.mul(b, _c(G)), _c(gi))
                            x0 = builder.load(builder.gep(xs2p, [builder.mul(gidx, _c(2))]))
                            x1 = builder.load(builder.gep(xs2p, [builder.add(builder.mul(gidx, _c(2)), _c(1))]))
                            if len(fm) == 1:
                                o = builder.fmul(fm[0], builder.fadd(x0, x1))
                            else:
                                o = builder.fadd(builder.fmul(fm[0], x0), builder.fmul(fm[1], x1))
                            builder.store(builder.fadd(builder.load(offs[r]), o), offs[r])
            for r in range(nr):
                s = builder.fadd(_hsum(builder, builder.load(accs[r])), builder.load(offs[r]))
                builder.store(s, builder.gep(outp, [builder.add(o0, _c(r))]))
            builder.branch(end)
    builder.position_at_end(end)


# --- decode on int8 activations -----------------------------------------------------------------

def _i8_group_dot(builder, fmt, q, xv):
    """<8 x i32> lane dot products of a group's q with 32 int8 activations."""
    if fmt.signed:
        aw = builder.call(_decl(builder, "llvm.abs.v32i8", V32B, [V32B, ir.IntType(1)]), [q, ir.Constant(ir.IntType(1), 0)])
        return _dot_u8s8(builder, aw, _psign(builder, xv, q))
    return _dot_u8s8(builder, q, xv)


def _sum_terms(builder, fmt, g):
    """Per half (or per group): the coefficients (a, b) of the int8 kernels' float terms
    a * sum(xhat) + b * sum(x): a = -K s (K the offset, or the centre of a format with mins; None
    if 0), b = m + centre * s (None without mins)."""
    k = _ioff(fmt)
    a = [_fop(builder, builder.fmul, ir.Constant(F32, -float(k)), v) for v in g.s] if k else None
    return a, _mins(builder, fmt, g)


def _block_terms(builder, fmt, groups, region_at, macc, sacc):
    """Add a block's float terms (offsets, centres, mins) to macc (<8 x float> accumulator) and
    sacc (float): a block whose scales come as Lanes of vectors that run along its groups (or
    halves) in order takes one fma per vector and coefficient (Q4_K: 8 groups' mins in one);
    scalar scales one fma per group or half. region_at(kind, unit, idx) -> pointer to the sums
    (kind 'sh' / 's', unit 16 or 32) at index idx (a group or half number within the block)."""
    coefs = [_sum_terms(builder, fmt, g) for g in groups]
    unit = 16 if fmt.halves == 2 else 32
    for which, kind in ((0, "sh"), (1, "s")):
        per = [c[which] for c in coefs]
        if per[0] is None:
            continue
        vals = [v for lst in per for v in lst]                     # in (group, half) order
        if all(isinstance(v, Lane) for v in vals):
            runs, ok = {}, True
            for pos, v in enumerate(vals):
                r = runs.setdefault(id(v.vec), [v.vec, pos - v.i, []])
                ok &= r[1] == pos - v.i
                r[2].append(v.i)
            if ok and all(sorted(r[2]) == list(range(8)) for r in runs.values()):
                for vec, base, _ in runs.values():
                    p = builder.bitcast(region_at(kind, unit, base), V8F.as_pointer())
                    builder.store(_vfma(builder, vec, builder.load(p, align=4), builder.load(macc)), macc)
                continue
        for pos, v in enumerate(vals):
            x = builder.load(region_at(kind, unit, pos))
            builder.store(builder.fadd(builder.load(sacc), builder.fmul(_scalar(builder, v), x)), sacc)


def _lane_dup(builder, v16, h):
    """<16 x i16> [v[8h:8h+8], v[8h:8h+8]]: elements 8h..8h+7 in both 128-bit lanes; on x86 through
    an empty asm, so that LLVM does not fold the shuffles that read it back into one cross-lane
    shuffle (vpshufb + vpermq per group, where an in-lane vpshufb suffices)."""
    V16H = ir.VectorType(I16, 16)
    d = builder.shuffle_vector(v16, v16, ir.Constant(ir.VectorType(I32, 16), list(range(8 * h, 8 * h + 8)) * 2))
    if TARGET.x86 and TARGET.avx2:
        d = builder.asm(ir.FunctionType(V16H, [V16H]), "", "=x,0", [d], side_effect=False)
    return d


# int32 accumulator chains per block in the 256-value formats' decode kernel: vpdpwssd (VNNI) adds
# into its accumulator with ~4 cycles of latency, so one chain through a block's 8 groups cost 32
# cycles a block (decode ran at 0.88x the vpmaddwd + vpaddd code); vpaddd's 1 cycle needs no
# split. (The prompt kernel's 8 tokens are 8 chains already.)
K_CHAINS = 4 if TARGET.vnni else 1


def _tree_add(builder, vs):
    """The sum of a list of integer vectors, as a balanced tree of adds."""
    while len(vs) > 1:
        vs = [builder.add(vs[i], vs[i + 1]) if i + 1 < len(vs) else vs[i] for i in range(0, len(vs), 2)]
    return vs[0]


def _cg_mv_i8_k(fmt, nrows, builder, w_p, woff, rstride, nb, xqp, xsp, outp, o0):
    """The int8 decode kernel of a 256-value format as llama.cpp's Q8_K dot products: x quantized
    with one scale per 256 values (quantize_xk), each group's u8 x s8 products paired by vpmaddubsw
    and multiplied by the integer scales of its halves in vpmaddwd, summed over the block as int32
    and converted once per block; offsets and mins on x's integer sums per 16 (vpmaddwd again).
    About 5 vector ops per 32 weights against 14 with a scale per 4 values (decode is compute
    bound at one thread)."""
    ngr = builder.mul(nb, _c(8))
    xkp = builder.gep(xqp, [builder.mul(ngr, _c(32))])                 # xq[n:2n]
    dkp = builder.gep(xsp, [builder.mul(ngr, _c(6))])                  # one scale per 256
    bsp = builder.bitcast(builder.gep(xsp, [builder.mul(ngr, _c(7))]), I8.as_pointer())  # int16 per 16
    accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(2)]
    V16H = ir.VectorType(I16, 16)

    def block(b, row, a):
        boff = builder.add(builder.add(woff, builder.mul(_c(row), rstride)), builder.mul(b, _c(fmt.size)))
        e = Emit(builder, w_p, boff, fmt.size)
        # every cache line of the block PF_DIST ahead (one prefetch per block left the other
        # lines of a 144-210 byte block to the hardware prefetcher)
        for line in range(0, fmt.size, 64):
            _prefetch(builder, w_p, builder.add(boff, _c(PF_DIST + line)))
        groups = fmt.unpack(e)
        ks = fmt.kscales(e)
        iacc = [ir.Constant(V8I, [0] * 8)] * K_CHAINS
        xb = builder.mul(b, _c(256))
        dups = [_lane_dup(builder, ks.sc, h) for h in range(2)]
        for j, g in enumerate(groups):
            xv = _vload(builder, xkp, builder.add(xb, _c(32 * j)), V32B)
            if fmt.signed:
                aw = builder.call(_decl(builder, "llvm.abs.v32i8", V32B, [V32B, ir.IntType(1)]), [g.q, ir.Constant(ir.IntType(1), 0)])
                p = _pmaddubsw(builder, aw, _psign(builder, xv, g.q))
            else:
                p = _pmaddubsw(builder, g.q, xv)
            # group j's two half scales, 8 x i16 each: an in-lane shuffle (one vpshufb) of the 8
            # scales of its half block, copied into both 128-bit lanes once per 4 groups
            jj = j % 4
            scj = builder.shuffle_vector(dups[j // 4], dups[j // 4],
                                         ir.Constant(ir.VectorType(I32, 16), [2 * jj] * 8 + [8 + 2 * jj + 1] * 8))
            iacc[j % K_CHAINS] = _dpwssd(builder, iacc[j % K_CHAINS], p, scj)
        acc = _tree_add(builder, iacc)
        bs = _vload(builder, bsp, builder.mul(b, _c(32)), V16H)
        if fmt.offset:
            off = _pmaddwd(builder, ks.sc, bs)
            acc = builder.sub(acc, builder.shl(off, ir.Constant(V8I, [_shift_of(fmt.offset)] * 8)))
        dk = builder.load(builder.gep(dkp, [b]))
        f = _vfma(builder, _bcast(builder, builder.fmul(ks.d, dk)), builder.sitofp(acc, V8F), builder.load(accs[a]))
        if ks.m is not None:
            mi = builder.sitofp(_pmaddwd(builder, ks.m, bs), V8F)
            f = _vfma(builder, _bcast(builder, builder.fmul(ks.dm, dk)), mi, f)
        builder.store(f, accs[a])

    if nrows == 1:
        with cgutils.for_range(builder, nb) as loop:
            block(loop.index, 0, 0)
        sums = [_hsum(builder, builder.load(accs[0]))]
    else:
        with cgutils.for_range(builder, nb) as loop:
            for r in range(2):
                block(loop.index, r, r)
        sums = list(_hsum2(builder, builder.load(accs[0]), builder.load(accs[1])))
    for r, v in enumerate(sums):
        builder.store(v, builder.gep(outp, [builder.add(o0, _c(r))]))


def _cg_mv_i8(fmt, nrows, builder, w_p, woff, rstride, nb, xqp, xdp, xsp, outp, o0):
    """out[o0 + r] = row r . x on int8 activations, r < nrows (1 or 2). Per group one integer
    dot product, converted and scaled by s and the lanes' x scales; offsets, centres and mins as
    float terms on x's sums (quantize_x), per block."""
    G = fmt.groups
    accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(2)]
    maccs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(2)]
    saccs = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(2)]
    ngr = builder.mul(nb, _c(G))

    def block(b, row, a, pf=True):
        boff = builder.add(builder.add(woff, builder.mul(_c(row), rstride)), builder.mul(b, _c(fmt.size)))
        if PF_DIST and pf:
            _prefetch(builder, w_p, builder.add(boff, _c(PF_DIST)))
        groups = fmt.unpack(Emit(builder, w_p, boff, fmt.size))
        g0 = builder.mul(b, _c(G))
        for gi, g in enumerate(groups):
            gidx = builder.add(g0, _c(gi))
            ai = (a + gi) % 2 if nrows == 1 and G > 1 else a
            dot = _i8_group_dot(builder, fmt, g.q, _vload(builder, xqp, builder.mul(gidx, _c(32)), V32B))
            st = builder.fmul(_lanes(builder, g.s), _xvec(builder, xdp, builder.mul(gidx, _c(LANES))))
            builder.store(_vfma(builder, st, builder.sitofp(dot, V8F), builder.load(accs[ai])), accs[ai])

        def region_at(kind, unit, idx):
            base = {("sh", 16): 0, ("s", 16): 2, ("sh", 32): 4, ("s", 32): 5}[kind, unit]
            per = 2 if unit == 16 else 1
            i = builder.add(builder.mul(ngr, _c(base)), builder.add(builder.mul(g0, _c(per)), _c(idx)))
            return builder.gep(xsp, [i])
        _block_terms(builder, fmt, groups, region_at, maccs[a], saccs[a])

    if nrows == 1:
        if G == 1:
            with cgutils.for_range(builder, builder.ashr(nb, _c(1))) as loop:
                b = builder.mul(loop.index, _c(2))
                block(b, 0, 0)
                block(builder.add(b, _c(1)), 0, 1, pf=2 * fmt.size > 64)
            with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, _c(1)), _c(0))):
                block(builder.sub(nb, _c(1)), 0, 0)
        else:
            with cgutils.for_range(builder, nb) as loop:
                block(loop.index, 0, 0)
        tot = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                           builder.fadd(builder.load(maccs[0]), builder.load(maccs[1])))
        sums = [builder.fadd(_hsum(builder, tot), builder.fadd(builder.load(saccs[0]), builder.load(saccs[1])))]
    else:
        with cgutils.for_range(builder, nb) as loop:
            for r in range(2):
                block(loop.index, r, r)
        a0 = builder.fadd(builder.load(accs[0]), builder.load(maccs[0]))
        a1 = builder.fadd(builder.load(accs[1]), builder.load(maccs[1]))
        sums = [builder.fadd(v, builder.load(saccs[r])) for r, v in enumerate(_hsum2(builder, a0, a1))]
    for r, v in enumerate(sums):
        builder.store(v, builder.gep(outp, [builder.add(o0, _c(r))]))


# --- prefill: MAXT tokens at a time on int8 activations -----------------------------------------

# the token spans of a prompt kernel's body: tokens 0-1 always, 2-3 when there are more than 2,
# 4-7 when more than 4 (a short pass, a verify of 1-3 drafts or a step of 2-4 sequences, pays for
# its own tokens, not the group's 8; one body for every count: compile time); the branches go the
# same way for every group of a call
_SPANS = ((0, 2, 0), (2, 4, 2), (4, MAXT, 4))


def _spans(builder, ntok):
    return [(a, b, None if k == 0 else builder.icmp_signed(">", ntok, _c(k))) for a, b, k in _SPANS]


def _by_spans(builder, spans, fn):
    for a, b, cond in spans:
        if cond is None:
            for t in range(a, b):
                fn(t)
        else:
            with builder.if_then(cond, likely=True):
                for t in range(a, b):
                    fn(t)


def _cg_mm_i8(fmt, builder, w_p, woff, nb, b0, nbk, xqp, xgp, g_, ntok, outp, ocols, orow, ocol):
    """Blocks b0..b0+nbk of the row at byte woff (nb blocks) times tokens MAXT g .. + ntok, added
    to out[orow + t, ocol] (stored for b0 == 0)."""
    G = fmt.groups
    ngr = builder.mul(nb, _c(G))                     # groups of 32 in a row
    accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(MAXT)]
    offs = cgutils.alloca_once_value(builder, ZERO8)
    gg = builder.mul(g_, ngr)                        # the token group's first (group, token) cell
    k = _ioff(fmt)

    def xgv(field, gidx):
        return _xvec(builder, xgp, builder.add(builder.mul(builder.add(gg, gidx), _c(XG_FIELDS * MAXT)), _c(field * MAXT)))

    # one body for every token count: MAXT tokens always (a ragged group's missing ones read the
    # buffer's padding rows), only ntok of them stored (one body per count compiled 4.5x the code:
    # a first run's compile time). The tokens' 32 activations of a group lie side by side
    # (quantize_rows), at constant offsets from one pointer (a pointer per token took the
    # general registers: the loop reloaded them from the stack)
    for t in range(MAXT):
        builder.store(ZERO8, accs[t])
    builder.store(ZERO8, offs)
    spans = _spans(builder, ntok)
    with cgutils.for_range(builder, nbk) as loop:
        b = builder.add(b0, loop.index)
        boff = builder.add(woff, builder.mul(b, _c(fmt.size)))
        for line in range(0, fmt.size, 64):   # each line of the block (see _cg_mv_i8_k)
            _prefetch(builder, w_p, builder.add(boff, _c(PF_DIST + line)))
        groups = fmt.unpack(Emit(builder, w_p, boff, fmt.size))
        for gi, g in enumerate(groups):
            gidx = builder.add(builder.mul(b, _c(G)), _c(gi))
            if fmt.signed:
                aw = builder.call(_decl(builder, "llvm.abs.v32i8", V32B, [V32B, ir.IntType(1)]),
                                  [g.q, ir.Constant(ir.IntType(1), 0)])
            sv = _lanes(builder, g.s)
            xg0 = builder.mul(builder.add(gg, gidx), _c(32 * MAXT))

            def tok(t):
                xv = _vload(builder, xqp, builder.add(xg0, _c(32 * t)), V32B)
                dot = _dot_u8s8(builder, aw, _psign(builder, xv, g.q)) if fmt.signed else _dot_u8s8(builder, g.q, xv)
                st = builder.fmul(sv, xgv(XG_L + t, gidx))
                builder.store(_vfma(builder, st, builder.sitofp(dot, V8F), builder.load(accs[t])), accs[t])
            _by_spans(builder, spans, tok)
            o = builder.load(offs)
            if k:
                kc = ir.Constant(F32, -float(k))
                if len(g.s) == 1:
                    o = _vfma(builder, _bc(builder, _fop(builder, builder.fmul, kc, g.s[0])), xgv(XG_SH, gidx), o)
                else:
                    for h in range(2):
                        o = _vfma(builder, _bc(builder, _fop(builder, builder.fmul, kc, g.s[h])), xgv(XG_SH0 + h, gidx), o)
            mn = _mins(builder, fmt, g)
            if mn is not None:
                if len(mn) == 1:
                    o = _vfma(builder, _bc(builder, mn[0]), xgv(XG_S, gidx), o)
                else:
                    for h in range(2):
                        o = _vfma(builder, _bc(builder, mn[h]), xgv(XG_S0 + h, gidx), o)
            builder.store(o, offs)
    res = builder.fadd(_hsum8(builder, [builder.load(a) for a in accs]), builder.load(offs))
    first = builder.icmp_signed("==", b0, _c(0))
    for t in range(MAXT):
        with builder.if_then(builder.icmp_signed("<", _c(t), ntok)):
            v = builder.extract_element(res, _c32(t))
            op = builder.gep(outp, [builder.add(builder.mul(builder.add(orow, _c(t)), ocols), ocol)])
            builder.store(builder.select(first, v, builder.fadd(builder.load(op), v)), op)


# --- prefill on VNNI: the tokens in the vector lanes ----------------------------------------------
# With vpdpbusd the k-lane kernel above (8 lanes = 8 column quads of one token, a scale per quad)
# pays a convert, a multiply and an fma per 32 weights and token. Here the lanes are the MAXT
# tokens of a pass (quantize_rows_tl lays each group of 32 columns out as 8 column quads x 8
# tokens), a scale per TL_SUB activation values: per group and row the 8 quads of the row's q are
# broadcast in turn (vpbroadcastd from a stack slot, a load) and multiplied with the 8 tokens'
# quads (vpdpbusd: one instruction, 8 tokens x 4 values), summed per TL_SUB values in int32,
# converted once per TL_SUB. TL_ROWS rows share each load of the tokens' quads. Signed formats' q is made unsigned
# (q + 128, one xor per group and row) and 128 times the tokens' sums of xhat taken back; unsigned
# ones subtract their offset (or centre) times those sums the same way (one fma per group and row).
TL_ROWS = 4
# activation scales: per column quad, as the k-lane kernel's (a scale per 8 or 16 values flipped
# the chat test's near tie, "L'Étoile"), but each an integer multiple of the group's: quad k's scale
# is d * m_k (d = amax/127/128 of the group, m_k = ceil(128 amax_k / amax) in 1..128), so a row's 8
# quad products are multiplied by m_k (vpmulld) and summed as int32 (at most 8 * 4 * 255 * 127 *
# 128 < 2^31) and converted once per group. (Powers of two for m_k: Gemma 3's KL 0.0050 > 0.005.)
TL_S0 = 0                     # per (token group, group of 32): fields of MAXT values: the 8 quads'
TL_D = 8                      # multipliers m_k (int32 bits), d, the sum of the values the int8 stand
TL_SH = 9                     # for (xhat), the exact sum of x
TL_X = 10
TL_FIELDS = 11
TOKEN_LANES = TARGET.vnni      # the 32-value formats' prompt passes run this (token_lanes)


def _cg_mm_i8_tl(fmt, nr, builder, w_p, woff, rstride, nb, b0, nbk, xtp, xfp, g_, ntok, outp, ocols, orow, ocol):
    """Rows woff, woff + rstride, ... (nr of them) x tokens MAXT g .. + ntok, blocks b0..b0+nbk, into
    out[orow + t, ocol + r] (stored for b0 == 0, else added); xtp / xfp from quantize_rows_tl."""
    G = fmt.groups
    ngr = builder.mul(nb, _c(G))
    accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(nr)]
    # the unpacked q of a block's rows wait in memory for their quads' broadcasts (an empty asm takes
    # the slots' address and clobbers memory, or LLVM turns the quad loads back into in-register
    # shuffles, which take the shuffle ports). Two sets of slots: a block's q are stored one block
    # ahead of their use, so the broadcasts read stores that have long completed (loads waiting on
    # the stores just made cost 9 % of the kernel: 57.6 vs 62.8 G MAC/s on Q4_0, Zen 4)
    nsl = G * nr
    slotbuf = cgutils.alloca_once(builder, V32B, size=2 * nsl)

    def boff_of(b, r):
        return builder.add(builder.add(woff, builder.mul(_c(r), rstride)), builder.mul(b, _c(fmt.size)))

    def stage(b, par):
        """Unpack block b's rows into slot set par (0 / 1)."""
        base = builder.gep(slotbuf, [builder.mul(par, _c(nsl))])
        for r in range(nr):
            boff = boff_of(b, r)
            _prefetch(builder, w_p, builder.add(boff, _c(PF_DIST)))
            for gi, g in enumerate(fmt.unpack(Emit(builder, w_p, boff, fmt.size))):
                q = g.q
                if fmt.signed:
                    q = builder.xor(q, ir.Constant(V32B, [0x80] * 32))
                builder.store(q, builder.gep(base, [_c(gi * nr + r)]))
        builder.asm(ir.FunctionType(ir.VoidType(), [slotbuf.type]), "", "r,~{memory}", [slotbuf], side_effect=True)

    off = 128 if fmt.signed else _ioff(fmt)
    with builder.if_then(builder.icmp_signed(">", nbk, _c(0))):
        stage(b0, _c(0))
    last = builder.add(b0, builder.sub(nbk, _c(1)))
    with cgutils.for_range(builder, nbk) as loop:
        b = builder.add(b0, loop.index)
        par = builder.and_(loop.index, _c(1))
        nxt = builder.add(b, _c(1))
        # the next block's q into the other set (the last block restages itself: harmless)
        stage(builder.select(builder.icmp_signed(">", nxt, last), last, nxt), builder.xor(par, _c(1)))
        cur = builder.gep(slotbuf, [builder.mul(par, _c(nsl))])
        # this block's scales and minimums (its q, unpacked again here, are dead code)
        rgroups = [fmt.unpack(Emit(builder, w_p, boff_of(b, r), fmt.size)) for r in range(nr)]
        slots = [[builder.gep(cur, [_c(gi * nr + r)]) for r in range(nr)] for gi in range(G)]
        for gi in range(G):
            cell = builder.add(builder.mul(g_, ngr), builder.add(builder.mul(b, _c(G)), _c(gi)))
            xb = builder.mul(cell, _c(32 * MAXT))
            fb = builder.mul(cell, _c(TL_FIELDS * MAXT))
            xv = [_vload(builder, xtp, builder.add(xb, _c(32 * k)), V32B) for k in range(8)]
            xfi = builder.bitcast(xfp, I32.as_pointer())
            shifts = [builder.load(builder.bitcast(builder.gep(xfi, [builder.add(fb, _c(MAXT * (TL_S0 + k)))]), V8I.as_pointer()), align=4)
                      for k in range(8)]
            dv = _xvec(builder, xfp, builder.add(fb, _c(MAXT * TL_D)))
            sh = _xvec(builder, xfp, builder.add(fb, _c(MAXT * TL_SH))) if off else None
            for r in range(nr):
                g = rgroups[r][gi]
                parts = []
                for k in range(8):
                    qp = builder.gep(builder.bitcast(slots[gi][r], I32.as_pointer()), [_c32(k)])
                    wv = builder.insert_element(ir.Constant(V8I, ir.Undefined), builder.load(qp, align=4), _c32(0))
                    wv = builder.shuffle_vector(wv, wv, ir.Constant(V8I, [0] * 8))
                    parts.append(builder.mul(_dpbusd(builder, ir.Constant(V8I, [0] * 8), builder.bitcast(wv, V32B), xv[k]), shifts[k]))
                u = builder.fmul(builder.sitofp(_tree_add(builder, parts), V8F), dv)
                if off:
                    u = _vfma(builder, ir.Constant(V8F, [-float(off)] * 8), sh, u)
                a = _vfma(builder, _bc(builder, g.s[0]), u, builder.load(accs[r]))
                mn = _mins(builder, fmt, g)
                if mn is not None:
                    a = _vfma(builder, _bc(builder, mn[0]), _xvec(builder, xfp, builder.add(fb, _c(MAXT * TL_X))), a)
                builder.store(a, accs[r])
    first = builder.icmp_signed("==", b0, _c(0))
    for r in range(nr):
        res = builder.load(accs[r])
        for t in range(MAXT):
            with builder.if_then(builder.icmp_signed("<", _c(t), ntok)):
                v = builder.extract_element(res, _c32(t))
                op = builder.gep(outp, [builder.add(builder.mul(builder.add(orow, _c(t)), ocols), builder.add(ocol, _c(r)))])
                builder.store(builder.select(first, v, builder.fadd(builder.load(op), v)), op)


def _kswap(builder, a, b, width, hi):
    """vpunpckl/h{wd,dq,qdq} on two 256-bit values seen as <n x i{width}>: per 128-bit lane the low
    (hi False) or high halves of a and b interleaved."""
    n = 256 // width
    ty = ir.VectorType(ir.IntType(width), n)
    a, b = builder.bitcast(a, ty), builder.bitcast(b, ty)
    half = n // 4
    idx = []
    for lane in range(2):
        base = lane * (n // 2) + (half if hi else 0)
        for i in range(half):
            idx += [base + i, n + base + i]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, n), idx))


def _k_transpose(builder, qs):
    """The 8 groups' q (<32 x i8> each: half 2j in the low 128-bit lane, 2j + 1 in the high) as
    quantize_rows_k lays the activations out: vector k, lane L, word p = the bytes 2k, 2k + 1 of
    half 2p + L (an 8 x 8 transpose of 16-bit words in each lane: 24 unpacks a block and row)."""
    a = [_kswap(builder, qs[j], qs[j + 1], 16, hi) for j in range(0, 8, 2) for hi in (False, True)]
    # a[2i + hi]: groups 2i, 2i + 1 interleaved, words 0-3 (hi: 4-7)
    b = [_kswap(builder, a[2 * i + w], a[2 * i + 2 + w], 32, hi) for i in (0, 2) for w in (0, 1) for hi in (False, True)]
    # b[4 (i // 2) + 2 w + hi]: groups 2i .. 2i + 3, words 4w + 2hi, + 1
    out = []
    for k in range(8):
        w, r = k // 4, k % 4
        lo, hi2 = b[2 * w + r // 2], b[4 + 2 * w + r // 2]
        out.append(builder.bitcast(_kswap(builder, lo, hi2, 64, r % 2 == 1), V32B))
    return out


# the prompt kernel's loop order (_cg_mm_i8_k): with AVX-512's 32 vector registers (the VNNI hosts)
K_REGS32 = TARGET.vnni

# word i of a 16-lane scale vector in the transposed layout belongs to half 2 (i % 8) + i // 8
K_HALF_OF = [2 * (i % 8) + i // 8 for i in range(16)]


def _cg_mm_i8_k(fmt, builder, w_p, woff, nb, b0, nbk, xkp, xkfp, g_, ntok, outp, ocols, orow, ocol):
    """The prompt matmul of a 256-value format on quantize_rows_k's int8 activations: per block the
    8 groups' q transposed into the activations' layout (_k_transpose: each 32-byte vector then
    holds two values of each of the 16 halves, so that one vector of half scales serves every
    vpmaddwd of the block) and the weights' half scales in that order; per token the scales times
    the token's multipliers (one vpmullw, |sc m| <= 2048); per vector and token vpmaddubsw and
    vpdpwssd into the token's int32 accumulator; per block the offset term on the tokens' integer
    sums per 16 (one vpmaddwd per token, subtracted as an integer), the tokens' eight int32 lanes
    summed into one vector over the tokens (six vphaddd, simd._hsum8), the mins' the same way, one
    conversion and one fma each with d (dm) times the tokens' d: a single float accumulator whose
    lanes are the tokens. (A float accumulator per token took 8 of the 16 vector registers and 3-4
    shuffles, converts and fmas per token and block: half the instructions of a block beside the
    dot products.)"""
    V16H = ir.VectorType(I16, 16)
    iaccs = [cgutils.alloca_once_value(builder, ir.Constant(V8I, [0] * 8)) for _ in range(MAXT)]
    maccs = [cgutils.alloca_once_value(builder, ir.Constant(V8I, [0] * 8)) for _ in range(MAXT)]
    sslots = [cgutils.alloca_once(builder, V16H) for _ in range(MAXT)]
    acc = cgutils.alloca_once_value(builder, ZERO8)
    spans = _spans(builder, ntok)
    with cgutils.for_range(builder, nbk) as loop:
        b = builder.add(b0, loop.index)
        boff = builder.add(woff, builder.mul(b, _c(fmt.size)))
        for line in range(0, fmt.size, 64):   # each line of the block (see _cg_mv_i8_k)
            _prefetch(builder, w_p, builder.add(boff, _c(PF_DIST + line)))
        e = Emit(builder, w_p, boff, fmt.size)
        groups = fmt.unpack(e)
        ks = fmt.kscales(e)
        has_m = ks.m is not None
        cell = builder.add(builder.mul(g_, nb), b)                  # (token group, block)
        x0 = builder.mul(cell, _c(MAXT * 256))
        f0 = builder.mul(cell, _c(KF_CELL))
        scp = builder.shuffle_vector(ks.sc, ks.sc, ir.Constant(ir.VectorType(I32, 16), K_HALF_OF))
        msp = builder.bitcast(builder.gep(xkfp, [builder.add(f0, _c(KF_M))]), I8.as_pointer())

        def scales(t):                  # the token's sc_h m_h in the transposed order
            builder.store(builder.mul(scp, _vload(builder, msp, _c(32 * t), V16H)), sslots[t])
            builder.store(ir.Constant(V8I, [0] * 8), iaccs[t])
        _by_spans(builder, spans, scales)
        vs = _k_transpose(builder, [g.q for g in groups])
        avs = [builder.call(_decl(builder, "llvm.abs.v32i8", V32B, [V32B, ir.IntType(1)]), [v, ir.Constant(ir.IntType(1), 0)])
               for v in vs] if fmt.signed else None

        def dot(t, k):
            xv = _vload(builder, xkp, builder.add(x0, _c(256 * t + 32 * k)), V32B)
            p = _pmaddubsw(builder, avs[k], _psign(builder, xv, vs[k])) if fmt.signed else _pmaddubsw(builder, vs[k], xv)
            builder.store(_dpwssd(builder, builder.load(iaccs[t]), p, builder.load(sslots[t])), iaccs[t])
        if K_REGS32:
            # vectors outer, tokens inner: 8 independent vpdpwssd chains (VNNI's ~4-cycle latency);
            # 8 accumulators and 8 scale vectors live, with AVX-512's 32 registers
            for k in range(8):
                _by_spans(builder, spans, lambda t, k=k: dot(t, k))
        else:
            # tokens outer: the block's 8 vectors, one accumulator and one scale vector live (16
            # registers: the other order spilled, Q4_K 73 -> 55 G MAC/s compiled for haswell);
            # vpaddd's 1-cycle latency needs no second chain
            _by_spans(builder, spans, lambda t: [dot(t, k) for k in range(8)])
        dk = _xvec(builder, xkfp, f0)                               # the 8 tokens' d
        bsp = builder.bitcast(builder.gep(xkfp, [builder.add(f0, _c(MAXT))]), I8.as_pointer())

        def fin(t):
            bs = _vload(builder, bsp, _c(32 * t), V16H)
            if fmt.offset:
                a = builder.load(iaccs[t])
                a = builder.sub(a, builder.shl(_pmaddwd(builder, ks.sc, bs), ir.Constant(V8I, [_shift_of(fmt.offset)] * 8)))
                builder.store(a, iaccs[t])
            if has_m:
                builder.store(_pmaddwd(builder, ks.m, bs), maccs[t])
        if fmt.offset or has_m:
            _by_spans(builder, spans, fin)
        tot = builder.sitofp(_hsum8(builder, [builder.load(a) for a in iaccs]), V8F)
        f = _vfma(builder, builder.fmul(_bcast(builder, ks.d), dk), tot, builder.load(acc))
        if has_m:
            mt = builder.sitofp(_hsum8(builder, [builder.load(a) for a in maccs]), V8F)
            f = _vfma(builder, builder.fmul(_bcast(builder, ks.dm), dk), mt, f)
        builder.store(f, acc)
    res = builder.load(acc)
    first = builder.icmp_signed("==", b0, _c(0))
    for t in range(MAXT):
        with builder.if_then(builder.icmp_signed("<", _c(t), ntok)):
            v = builder.extract_element(res, _c32(t))
            op = builder.gep(outp, [builder.add(builder.mul(builder.add(orow, _c(t)), ocols), ocol)])
            builder.store(builder.select(first, v, builder.fadd(builder.load(op), v)), op)


# --- dequantization -----------------------------------------------------------------------------

def _cg_dequant(fmt, builder, w_p, woff, nb, dp, doff):
    """nb blocks from byte woff to float32 dst[doff:doff + nb * block]."""
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        boff = builder.add(woff, builder.mul(b, _c(fmt.size)))
        groups = fmt.unpack(Emit(builder, w_p, boff, fmt.size))
        for gi, g in enumerate(groups):
            fm = _fmins(builder, fmt, g)
            base = builder.add(doff, builder.add(builder.mul(b, _c(fmt.block)), _c(32 * gi)))
            for j in range(4):
                h = j // 2 if len(g.s) == 2 else 0
                v = builder.fmul(_bc(builder, g.s[h]), _floats(builder, fmt, g.q, j))
                if fm is not None:
                    v = builder.fadd(v, _bc(builder, fm[h]))
                p = builder.gep(dp, [builder.add(base, _c(8 * j))])
                builder.store(v, builder.bitcast(p, V8F.as_pointer()), align=4)


# --- intrinsics: one per format, and dispatchers over the type id -------------------------------

def _ptr(context, builder, ty, v, i8=False):
    p = context.make_array(ty)(context, builder, v).data
    return builder.bitcast(p, I8.as_pointer()) if i8 else p


def _switch(builder, t, fmts, emit):
    """switch (t) { case fmt.id: emit(fmt) } over fmts; other ids do nothing."""
    fn = builder.function
    end = fn.append_basic_block("fmt.end")
    sw = builder.switch(t, end)
    for f in fmts:
        bb = fn.append_basic_block(f"fmt.{f.name}")
        sw.add_case(ir.Constant(t.type, f.id), bb)
        with builder.goto_block(bb):
            emit(f)
            builder.branch(end)
    builder.position_at_end(end)


ALL = tuple(FORMATS.values())


def mask_of(type_ids) -> int:
    """The formats mask of a set of GGUF type ids (bit id per block format among them)."""
    m = 0
    for t in type_ids:
        if int(t) in FORMATS:
            m |= 1 << int(t)
    return m


def _formats(mask):
    """The formats a dispatcher's switch holds: those in `mask` when it is a compile-time
    constant (a Literal[int], as kernels.qmatmul's entry points pass it), else every format."""
    if isinstance(mask, types.IntegerLiteral):
        return tuple(f for f in ALL if mask.literal_value >> f.id & 1)
    return ALL


@intrinsic(prefer_literal=True)
def mv_float_any(typingctx, mask, t, w, woff, rstride, nb, x, xs2, out, o0, nrows):
    sig = types.void(mask, t, w, woff, rstride, nb, x, xs2, out, o0, nrows)
    fmts = _formats(mask)

    def codegen(context, builder, signature, args):
        t_, w_, woff_, rs_, nb_, x_, xs2_, out_, o0_, nr_ = args[1:]
        at = signature.args[1:]
        wp = _ptr(context, builder, at[1], w_, True)
        xp, xs2p, outp = (_ptr(context, builder, at[i], v) for i, v in ((5, x_), (6, xs2_), (7, out_)))
        _switch(builder, t_, fmts, lambda f: _cg_mv_float(f, builder, wp, woff_, rs_, nb_, xp, xs2p, outp, o0_, nr_))
        return context.get_dummy_value()
    return sig, codegen


def _make_mv_i8_any(nrows):
    @intrinsic(prefer_literal=True)
    def mv_i8_any(typingctx, mask, t, w, woff, rstride, nb, xq, xd, xs, out, o0):
        sig = types.void(mask, t, w, woff, rstride, nb, xq, xd, xs, out, o0)
        fmts = _formats(mask)

        def codegen(context, builder, signature, args):
            t_, w_, woff_, rs_, nb_, xq_, xd_, xs_, out_, o0_ = args[1:]
            at = signature.args[1:]
            wp = _ptr(context, builder, at[1], w_, True)
            xqp = _ptr(context, builder, at[5], xq_, True)
            xdp, xsp, outp = (_ptr(context, builder, at[i], v) for i, v in ((6, xd_), (7, xs_), (8, out_)))
            _switch(builder, t_, fmts, lambda f: (
                _cg_mv_i8_k(f, nrows, builder, wp, woff_, rs_, nb_, xqp, xsp, outp, o0_) if f.kscales is not None else
                _cg_mv_i8(f, nrows, builder, wp, woff_, rs_, nb_, xqp, xdp, xsp, outp, o0_)))
            return context.get_dummy_value()
        return sig, codegen
    return mv_i8_any


mv_i8_1_any = _make_mv_i8_any(1)
mv_i8_2_any = _make_mv_i8_any(2)


@intrinsic(prefer_literal=True)
def mm_i8_any(typingctx, mask, t, w, woff, nb, b0, nbk, xq, xg, xk, xkf, g, ntok, out, orow, ocol):
    sig = types.void(mask, t, w, woff, nb, b0, nbk, xq, xg, xk, xkf, g, ntok, out, orow, ocol)
    fmts = _formats(mask)

    def codegen(context, builder, signature, args):
        t_, w_, woff_, nb_, b0_, nbk_, xq_, xg_, xk_, xkf_, g_, nt_, out_, orow_, ocol_ = args[1:]
        at = signature.args[1:]
        wp = _ptr(context, builder, at[1], w_, True)
        xqp = _ptr(context, builder, at[6], xq_, True)
        xgp = _ptr(context, builder, at[7], xg_)
        xkp = _ptr(context, builder, at[8], xk_, True)
        xkfp = _ptr(context, builder, at[9], xkf_)
        oa = context.make_array(at[12])(context, builder, out_)
        ocols = builder.extract_value(oa.shape, 1)
        _switch(builder, t_, fmts, lambda f: (
            _cg_mm_i8_k(f, builder, wp, woff_, nb_, b0_, nbk_, xkp, xkfp, g_, nt_, oa.data, ocols, orow_, ocol_)
            if f.kscales is not None else
            _cg_mm_i8(f, builder, wp, woff_, nb_, b0_, nbk_, xqp, xgp, g_, nt_, oa.data, ocols, orow_, ocol_)))
        return context.get_dummy_value()
    return sig, codegen


def _make_mm_i8_tl_any(nr):
    @intrinsic(prefer_literal=True)
    def mm_i8_tl_any(typingctx, mask, t, w, woff, rstride, nb, b0, nbk, xt, xf, g, ntok, out, orow, ocol):
        sig = types.void(mask, t, w, woff, rstride, nb, b0, nbk, xt, xf, g, ntok, out, orow, ocol)
        fmts = tuple(f for f in _formats(mask) if f.kscales is None)

        def codegen(context, builder, signature, args):
            t_, w_, woff_, rs_, nb_, b0_, nbk_, xt_, xf_, g_, nt_, out_, orow_, ocol_ = args[1:]
            at = signature.args[1:]
            wp = _ptr(context, builder, at[1], w_, True)
            xtp = _ptr(context, builder, at[7], xt_, True)
            xfp = _ptr(context, builder, at[8], xf_)
            oa = context.make_array(at[11])(context, builder, out_)
            ocols = builder.extract_value(oa.shape, 1)
            _switch(builder, t_, fmts if TOKEN_LANES else (), lambda f: _cg_mm_i8_tl(
                f, nr, builder, wp, woff_, rs_, nb_, b0_, nbk_, xtp, xfp, g_, nt_, oa.data, ocols, orow_, ocol_))
            return context.get_dummy_value()
        return sig, codegen
    return mm_i8_tl_any


mm_i8_tl_1_any = _make_mm_i8_tl_any(1)
mm_i8_tl_n_any = _make_mm_i8_tl_any(TL_ROWS)


@intrinsic(prefer_literal=True)
def dequant_any(typingctx, mask, t, w, woff, nb, dst, doff):
    sig = types.void(mask, t, w, woff, nb, dst, doff)
    fmts = _formats(mask)

    def codegen(context, builder, signature, args):
        t_, w_, woff_, nb_, dst_, doff_ = args[1:]
        at = signature.args[1:]
        wp = _ptr(context, builder, at[1], w_, True)
        dp = _ptr(context, builder, at[4], dst_)
        _switch(builder, t_, fmts, lambda f: _cg_dequant(f, builder, wp, woff_, nb_, dp, doff_))
        return context.get_dummy_value()
    return sig, codegen


# --- per-type tables for the njit drivers (constants baked into the compiled code) ---------------
_N = 64
BLOCK = np.zeros(_N, np.int64)      # values per block (0: not a block format)
BSIZE = np.zeros(_N, np.int64)      # bytes per block
for _f in ALL:
    BLOCK[_f.id], BSIZE[_f.id] = _f.block, _f.size


@njit(fastmath=False, cache=True)
def is_block(t):
    return 0 <= t < _N and BLOCK[t] > 0


@njit(fastmath=False, cache=True)
def block_of(t):
    """Values per block of type t (0: not a block format)."""
    return BLOCK[t] if 0 <= t < _N else 0


@njit(fastmath=FM, cache=True)
def rows_float(mask, t, wu8, off, cols, x, xs2, out, o0, r0, r1):
    """out[o0 + r] = W[r] . x for rows r0..r1 of a block-format matrix (float activations)."""
    nb = cols // BLOCK[t]
    rs = nb * BSIZE[t]
    k = MAXR if rs >= SHORT_ROW and BLOCK[t] == 32 else 1
    r = r0
    while r + k <= r1:
        mv_float_any(mask, t, wu8, off + r * rs, rs, nb, x, xs2, out, o0 + r, k)
        r += k
    for r in range(r, r1):
        mv_float_any(mask, t, wu8, off + r * rs, rs, nb, x, xs2, out, o0 + r, 1)


@njit(fastmath=FM, cache=True)
def rows_i8(mask, t, wu8, off, cols, xq, xd, xs, out, o0, r0, r1):
    """As rows_float on int8 activations (xq, xd, xs from quantize_x). Rows of at most PAIR_BYTES
    go two per pass, longer ones one per pass (one sequential stream, prefetched PF_DIST ahead)."""
    nb = cols // BLOCK[t]
    rs = nb * BSIZE[t]
    r2 = r0 + (r1 - r0) // 2 * 2 if rs <= PAIR_BYTES else r0
    for r in range(r0, r2, 2):
        mv_i8_2_any(mask, t, wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)
    for r in range(r2, r1):
        mv_i8_1_any(mask, t, wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)


@njit(fastmath=FM, cache=True)
def dequant_rows(mask, t, wu8, off, cols, r0, r1, dst):
    """dst[:r1-r0, :cols] = rows r0..r1 as float32 (dst C-contiguous)."""
    nb = cols // BLOCK[t]
    rs = nb * BSIZE[t]
    flat = dst.reshape(-1)
    for r in range(r0, r1):
        dequant_any(mask, t, wu8, off + r * rs, nb, flat, (r - r0) * cols)


@njit(fastmath=False, cache=True)
def _quantize4(v, i0, xq, o0):
    """v[i0:i0+4] to int8 in xq[o0:o0+4] with one scale, amax/127; returns (the scale, the sum
    of the int8 values, the sum of the values). (A plain call, which LLVM inlines: Numba's own
    inline="always" and array temporaries made the prompt quantizer take 3 s to compile.)"""
    m = np.float32(0.0)
    s = np.float32(0.0)
    for i in range(4):
        x = v[i0 + i]
        m = max(m, abs(x))
        s += x
    d = m / np.float32(127.0)
    inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
    ls = 0
    for i in range(4):
        q = np.int32(np.rint(v[i0 + i] * inv))
        xq[o0 + i] = q
        ls += q
    return d, ls, s


@njit(fastmath=FM, cache=True)
def quantize_x(x, xq, xd, xs):
    """x (float32, n a multiple of 32) -> xq int8 with a scale per 4 values: xd[LANES g + l] =
    amax/127 of x[32g + 4l:][:4]; xs (XS_PER_GROUP floats per group of 32, ng groups): sums of
    xhat (the values the int8 stand for) per 16 values at [0, 2ng), of x per 16 at [2ng, 4ng),
    of xhat per 32 at [4ng, 5ng), of x per 32 at [5ng, 6ng) (the kernels' float terms)."""
    ng = x.shape[0] // 32
    for g in range(ng):
        sh0 = np.float32(0.0)
        sh1 = np.float32(0.0)
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        for lane in range(LANES):
            d, ls, s4 = _quantize4(x, g * 32 + 4 * lane, xq, g * 32 + 4 * lane)
            xd[g * LANES + lane] = d
            if lane < 4:
                sh0 += d * np.float32(ls)
                s0 += s4
            else:
                sh1 += d * np.float32(ls)
                s1 += s4
        xs[2 * g] = sh0
        xs[2 * g + 1] = sh1
        xs[2 * ng + 2 * g] = s0
        xs[2 * ng + 2 * g + 1] = s1
        xs[4 * ng + g] = sh0 + sh1
        xs[5 * ng + g] = s0 + s1


@njit(fastmath=FM, cache=True)
def quantize_xk(x, xq, xs):
    """The 256-value formats' int8 activations (llama.cpp's Q8_K): x (n a multiple of 256) with one
    scale per 256 values, amax/127, into xq[n:2n]; the scales at xs[6 ng + i] (ng = n / 32) and the
    int16 sums of the int8 values per 16 in xs's bytes from float 7 ng on (see _cg_mv_i8_k)."""
    n = x.shape[0]
    ng = n // 32
    bs = xs[7 * ng:8 * ng].view(np.int16)
    for b in range(n // 256):
        m = np.float32(0.0)
        for i in range(256):
            m = max(m, abs(x[256 * b + i]))
        d = m / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        xs[6 * ng + b] = d
        for h in range(16):
            t = 0
            for i in range(16):
                q = np.int32(np.rint(x[256 * b + 16 * h + i] * inv))
                xq[n + 256 * b + 16 * h + i] = q
                t += q
            bs[16 * b + h] = t


@njit(fastmath=FM, cache=True)
def half_sums(x, xs2):
    """xs2[i] = the sum of x[16i:16i+16] (the float kernels' offsets and mins)."""
    for i in range(x.shape[0] // 16):
        s = np.float32(0.0)
        for j in range(16):
            s += x[16 * i + j]
        xs2[i] = s


@njit(fastmath=False, cache=True)
def _quantize_row(v, xq, t, xg, exact):
    """Token t of the prompt's int8 activations from v (cols,), into xq and xg (layouts in
    quantize_rows); exact: whether sum(x) is v's own (False: v is the residual of the row before,
    whose exact sums that row already carries)."""
    g, tl = t // MAXT, t % MAXT
    for b in range(v.shape[0] // 32):
        q = xq[g, b, tl]
        sh0 = np.float32(0.0)
        sh1 = np.float32(0.0)
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        for lane in range(LANES):
            d, ls, s4 = _quantize4(v, 32 * b + 4 * lane, q, 4 * lane)
            xg[g, b, XG_L + tl, lane] = d
            if lane < 4:
                sh0 += d * np.float32(ls)
                s0 += s4
            else:
                sh1 += d * np.float32(ls)
                s1 += s4
        if not exact:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
        xg[g, b, XG_SH0, tl] = sh0
        xg[g, b, XG_SH1, tl] = sh1
        xg[g, b, XG_SH, tl] = sh0 + sh1
        xg[g, b, XG_S0, tl] = s0
        xg[g, b, XG_S1, tl] = s1
        xg[g, b, XG_S, tl] = s0 + s1


@njit(fastmath=False, cache=True, parallel=True)
def quantize_rows(h, xq, xg, resid):
    """Rows of h (n, cols) to int8 with a scale per 4 values, laid out for mm_i8 by token groups of
    MAXT: xq (ceil((n + resid) / MAXT), cols / 32, MAXT, 32) int8, token t's 32 values of group b at
    [t // MAXT, b, t % MAXT]; xg (same groups, cols / 32, XG_FIELDS, MAXT) float32: per group the
    MAXT tokens' sum(xhat), sum(x) and their halves' (fields XG_SH .. XG_S1), then token t's LANES
    scales at [.., XG_L + t % MAXT, :]. A ragged last group's other rows are left as they are
    (the kernel reads them and drops their results).
    resid: also row n, the int8 quantization of what row n - 1's int8 values miss (h[n-1] - xhat):
    the matmul's rows n - 1 and n added give that token's product to about float precision."""
    n, cols = h.shape
    for t in prange(n):        # tokens on the cores
        _quantize_row(h[t], xq, t, xg, t >= 0)     # a bool, not the literal True: one compile
    if resid:
        r = np.empty(cols, np.float32)
        g, tl = (n - 1) // MAXT, (n - 1) % MAXT
        for i in range(cols):
            r[i] = h[n - 1, i] - np.float32(xq[g, i // 32, tl, i % 32]) * xg[g, i // 32, XG_L + tl, (i % 32) // 4]
        _quantize_row(r, xq, n, xg, n < 0)


@njit(fastmath=False, cache=True)
def _quantize_row_tl(v, xt, xf, t, exact):
    """Token t of the token-lane layout (quantize_rows_tl) from v (cols,)."""
    g, tl = t // MAXT, t % MAXT
    xfi = xf.view(np.int32)
    for b in range(v.shape[0] // 32):
        mg = np.float32(0.0)
        for i in range(32):
            mg = max(mg, abs(v[32 * b + i]))
        d = mg / np.float32(127.0 * 128.0)          # quad k's scale: d * m_k, m_k <= 128
        sx = np.float32(0.0)
        sh = np.float32(0.0)
        for k in range(8):
            m = np.float32(0.0)
            for i in range(4):
                m = max(m, abs(v[32 * b + 4 * k + i]))
            sk = max(1, min(128, np.int32(np.ceil(m * np.float32(128.0) / mg)))) if mg > 0 else 1
            dk = d * np.float32(sk)
            inv = np.float32(1.0) / dk if dk > 0 else np.float32(0.0)
            c = 0
            for i in range(4):
                x = v[32 * b + 4 * k + i]
                sx += x
                q = np.int32(np.rint(x * inv))
                xt[g, b, k, tl, i] = q
                c += q
            xfi[g, b, TL_S0 + k, tl] = sk
            sh += dk * np.float32(c)
        xf[g, b, TL_D, tl] = d
        xf[g, b, TL_SH, tl] = sh
        xf[g, b, TL_X, tl] = sx if exact else np.float32(0.0)


@njit(fastmath=False, cache=True, parallel=True)
def quantize_rows_tl(h, xt, xf, resid):
    """Rows of h (n, cols) to int8 with a scale per TL_SUB values, laid out for the token-lane prompt
    kernel (VNNI): xt (token groups, cols / 32, 8 column quads, MAXT tokens, 4) int8; xf (token
    groups, cols / 32, TL_FIELDS, MAXT) float32: the tokens' TL_NS scales, their sums of xhat (the
    values the int8 stand for) and of x per group.
    resid: also row n, what row n - 1's int8 values miss (as quantize_rows)."""
    n, cols = h.shape
    for t in prange(n):        # tokens on the cores
        _quantize_row_tl(h[t], xt, xf, t, t >= 0)
    if resid:
        r = np.empty(cols, np.float32)
        g, tl = (n - 1) // MAXT, (n - 1) % MAXT
        for i in range(cols):
            b, j = i // 32, i % 32
            r[i] = h[n - 1, i] - np.float32(xt[g, b, j // 4, tl, j % 4]) * (xf[g, b, TL_D, tl] * np.float32(xf.view(np.int32)[g, b, TL_S0 + j // 4, tl]))
        _quantize_row_tl(r, xt, xf, n, n < 0)


@njit(fastmath=False, cache=True)
def quantize_prompt(h, xq, xg, resid):
    """The 32-value formats' prompt activations for a matmul of h's rows (+ the residual row):
    quantize_rows_tl's layout where token_lanes, else quantize_rows's (xq, xg: that function's
    4-d buffers; the token-lane layout fits in them, reshaped)."""
    if token_lanes(h.shape[0] + (1 if resid else 0)):
        quantize_rows_tl(h, xq.reshape(xq.shape[0], xq.shape[1], 8, MAXT, 4),
                         xg.reshape(-1)[:xg.shape[0] * xg.shape[1] * TL_FIELDS * MAXT].reshape(xg.shape[0], xg.shape[1], TL_FIELDS, MAXT),
                         resid)
    else:
        quantize_rows(h, xq, xg, resid)


# The 256-value formats' prompt activations. llama.cpp's Q8_K (one scale amax/127 per 256 values)
# cost Gemma 3 270M's int8 prefill a top-32 KL of 0.0042 against transformers, nearly all of it in
# the FFN down projection (its input, GELU's gated output, is heavy-tailed: one outlier sets the
# scale of 255 others); per-16 scales there: 0.00096. So each half h of 16 values has its own
# scale d m_h: d = amax / 127 / K_SUB of the block, m_h = ceil(K_SUB amax_h / amax) in 1..K_SUB,
# int8 q_i = rint(x_i / (d m_h)). The kernel multiplies the weights' half scales by the token's
# m_h (one vpmullw per token and block, _cg_mm_i8_k), so the dot products stay int8 x 4-6 bit.
# K_SUB = 16 keeps a block's int32 sum exact: |sc m| <= 128 * 16 (Q6_K's int8 scales), |q_w -
# offset| <= 32, |q| <= 127, 256 values: < 2^31; the sums per 16 of q m fit int16 (32512).
# Measured on Gemma 3 (every K matrix in this form): KL 0.00075 (K_SUB 8: 0.0008, 64: 0.00067).
K_SUB = 16
KF_M = MAXT + MAXT * 8          # the multipliers' offset in a cell (after the d's and the sums)
KF_CELL = MAXT + MAXT * 8 * 2   # quantize_rows_k's floats per (token group, block): 8 d's, 8 x 16 int16 sums of q m, 8 x 16 int16 m


@njit(fastmath=False, cache=True)
def _kpos(i):
    """Where value i of a block sits in quantize_rows_k's layout (_k_transpose's): vector k = (i %
    16) // 2, 128-bit lane L = h % 2 and word h // 2 for its half h = i // 16, byte i % 2."""
    h, r = i // 16, i % 16
    return 32 * (r // 2) + 16 * (h % 2) + 2 * (h // 2) + r % 2


@njit(fastmath=False, cache=True)
def _quantize_row_k(v, xk, xkf, t, qn, fs):
    """Token t's K form (quantize_rows_k) from v (cols,); qn: int8 scratch of 256 (a block's q in
    value order, then moved to the layout as 16-bit words); fs: float32 scratch of 32."""
    g, tl = t // MAXT, t % MAXT
    nb = v.shape[0] // 256
    ah = fs[:16]
    inv = fs[16:32]
    q16 = qn.view(np.int16)
    x16 = xk.view(np.int16)
    for b in range(nb):
        vb = v[256 * b:256 * b + 256]
        for h in range(16):
            a = np.float32(0.0)
            for i in range(16):
                a = max(a, abs(vb[16 * h + i]))
            ah[h] = a
        m = np.float32(0.0)
        for h in range(16):
            m = max(m, ah[h])
        d = m / np.float32(127.0 * K_SUB)
        cell = g * nb + b
        xkf[cell * KF_CELL + tl] = d
        bs = xkf[cell * KF_CELL + MAXT:cell * KF_CELL + KF_M].view(np.int16)
        ms = xkf[cell * KF_CELL + KF_M:(cell + 1) * KF_CELL].view(np.int16)
        for h in range(16):
            mh = 1
            if m > 0:
                mh = min(K_SUB, max(1, int(np.ceil(np.float32(K_SUB) * ah[h] / m))))
            sc = d * np.float32(mh)
            inv[h] = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
            ms[16 * tl + 8 * (h % 2) + h // 2] = mh
        for h in range(16):
            s = 0
            iv = inv[h]
            for i in range(16):
                q = min(np.float32(127.0), max(np.float32(-127.0), np.rint(vb[16 * h + i] * iv)))
                qn[16 * h + i] = np.int8(q)
                s += np.int32(q)
            bs[16 * tl + h] = s * ms[16 * tl + 8 * (h % 2) + h // 2]
        base = (cell * MAXT * 256 + tl * 256) // 2
        for k in range(8):                          # _kpos as 16-bit words: word j of vector k
            for j in range(16):                     # = the pair k of half K_HALF_OF[j]
                x16[base + 16 * k + j] = q16[8 * (2 * (j % 8) + j // 8) + k]


@njit(fastmath=False, cache=True, parallel=True)
def quantize_rows_k(h, xk, xkf, resid):
    """The prompt's activations for the 256-value formats (mm_i8_k) in the form above, laid out by
    token groups of MAXT and blocks of 256: token t's int8 values of block b at
    xk[((t // MAXT) nb + b) MAXT 256 + (t % MAXT) 256:][:256] in _kpos's order, and per (group,
    block) cell KF_CELL floats of xkf: the MAXT tokens' d, their int16 sums of q m per 16 (16 per
    token), their int16 m per 16 (16 per token, in K_HALF_OF's order). Value i stands for q_i m_h d. resid: also row n, what row n - 1's values miss
    (as quantize_rows)."""
    n, cols = h.shape
    qn = np.empty((n, 256), np.int8)
    fs = np.empty((n, 32), np.float32)
    for t in prange(n):        # tokens on the cores (a serial quantizer was 6 % of a 2-thread prefill)
        _quantize_row_k(h[t], xk, xkf, t, qn[t], fs[t])
    if resid:
        r = np.empty(cols, np.float32)
        g, tl = (n - 1) // MAXT, (n - 1) % MAXT
        nb = cols // 256
        for i in range(cols):
            cell = g * nb + i // 256
            hh = (i % 256) // 16
            mh = xkf[cell * KF_CELL + KF_M:(cell + 1) * KF_CELL].view(np.int16)[16 * tl + 8 * (hh % 2) + hh // 2]
            r[i] = h[n - 1, i] - np.float32(xk[cell * MAXT * 256 + tl * 256 + _kpos(i % 256)]) * np.float32(mh) * xkf[cell * KF_CELL + tl]
        _quantize_row_k(r, xk, xkf, n, qn[0], fs[0])


# qmatmul.matmul_i8_group's work: tasks of rows (about 8 per thread, each task's rows of one column
# slice within MM_ROW_BYTES so they stay in L2 while every token group passes) x column slices of
# MM_COLS columns (8 tokens' int8 activations of a slice, 16 KiB, stay in L1 while the rows pass)
MM_ROW_BYTES = 128 * 1024
MM_COLS = 2048


# a pass of at most SHORT_PASS tokens reads whole rows: its few tokens' activations stay in L1
# anyway, and column slices made it read each row in pieces at the row stride (a cold line chain
# per piece that a light pass cannot hide: the down projection of a 2-token pass ran at 4.4 GB/s)
SHORT_PASS = 4


@njit(fastmath=False, cache=True)
def mm_slice_blocks(nb, t, n):
    """Blocks per column slice of mm_rows for a pass of n tokens (rows of out)."""
    return nb if n <= SHORT_PASS else max(1, min(nb, MM_COLS // BLOCK[t]))


@njit(fastmath=False, cache=True)
def mm_rows_per_task(rows, cols, t, n_threads, n):
    """Rows per task of qmatmul.matmul_i8_group: about 8 tasks per thread, the task's rows of one
    column slice within MM_ROW_BYTES, a multiple of 16 (tasks write whole 64-byte lines of out)."""
    kb = mm_slice_blocks(cols // BLOCK[t], t, n)
    per_thread = (rows + 8 * n_threads - 1) // (8 * n_threads)
    return max(16, min(64, MM_ROW_BYTES // (kb * BSIZE[t]), per_thread) // 16 * 16)


@njit(fastmath=False, cache=True)
def token_lanes(n):
    """Whether a prompt matmul of n rows (tokens, the residual row included) runs its 32-value
    formats on quantize_rows_tl's layout: on VNNI CPUs every pass does, however few its tokens (a
    token's result then does not depend on how a prompt is split into passes: a prefix from the
    cache and its rest give the bits of the whole prompt in one pass; shorter passes pay for 8
    lanes)."""
    return TOKEN_LANES and n > 0


@njit(fastmath=False, cache=True)
def mm_rows(mask, t, wu8, off, cols, xq, xg, xk, xkf, out, ocol, r0, r1):
    """out[:, ocol + r] = x @ W[r] for rows r0 <= r < r1 of a block-format matrix (one task of
    qmatmul.matmul_i8_group): column slices of about MM_COLS, within a slice MAXT tokens at a time
    (TL_ROWS rows at a time where token_lanes: xq, xg then hold quantize_rows_tl's layout)."""
    nb = cols // BLOCK[t]
    n = out.shape[0]
    rs = nb * BSIZE[t]
    kb = mm_slice_blocks(nb, t, n)
    tl = token_lanes(n) and BLOCK[t] == 32
    for b0 in range(0, nb, kb):
        nbk = min(kb, nb - b0)
        for g in range((n + MAXT - 1) // MAXT):
            nt = min(MAXT, n - g * MAXT)
            if tl:
                r = r0
                while r + TL_ROWS <= r1:
                    mm_i8_tl_n_any(mask, t, wu8, off + r * rs, rs, nb, b0, nbk, xq, xg, g, nt, out, g * MAXT, ocol + r)
                    r += TL_ROWS
                for r in range(r, r1):
                    mm_i8_tl_1_any(mask, t, wu8, off + r * rs, rs, nb, b0, nbk, xq, xg, g, nt, out, g * MAXT, ocol + r)
            else:
                for r in range(r0, r1):
                    mm_i8_any(mask, t, wu8, off + r * rs, nb, b0, nbk, xq, xg, xk, xkf, g, nt, out, g * MAXT, ocol + r)
