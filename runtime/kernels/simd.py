"""Matvec inner loops written as LLVM vector IR (Numba intrinsics).

Numba's scalar code cannot keep SIMD accumulators across the blocks of a row: LLVM vectorizes the
32 products of a block as a reduction and pays a horizontal sum per row and block, which held the
scalar kernels to ~8 GB/s. Here each block is handled with explicit <8 x float> vectors:

    t   = sum_j float(q[8j:8j+8]) * x[8j:8j+8]        (4 fused multiply-adds, j = 0..3)
    acc = fma(broadcast(d_block), t, acc)              (the block scale, no horizontal sum)

and the eight lanes of `acc` are summed once per row. Four rows share each load of x. The IR is
generic (no x86 intrinsics): LLVM lowers it for the host CPU (vpmovsxbd/vcvtdq2ps/vfmadd on AVX2,
vcvtph2ps for F16 with F16C, NEON on ARM). Activations stay float32, so results equal the scalar
kernels up to summation order.

Every kernel: `kernel(w, woff, rstride, nb, x, out, o0, nrows, xsum)` computes out[o0 + k] for
k < nrows (1..4) rows starting at byte woff of the uint8 buffer w, rows rstride bytes apart, nb
blocks of 32 columns; the f16 block scales (and Q4_1 mins) are read where they are, in the blocks
(a float32 copy cost a second memory stream in decode and its size in RAM); xsum the per-block
sums of x (Q4_0's -8 offset, Q4_1's mins).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import isa

# the CPU Numba compiles for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host): whether the x86
# intrinsics and asm below may be emitted; elsewhere the same computation is written as generic IR
TARGET = isa.target()

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V8F = ir.VectorType(F32, 8)
ZERO8 = ir.Constant(V8F, [0.0] * 8)

KIND_Q8_0, KIND_Q4_0, KIND_Q4_1, KIND_F16, KIND_BF16 = range(5)
MAXR = 4
SHORT_ROW = 4096     # bytes: shorter rows go one per pass (see rows_*)


def _vload(builder, base, off, vty):
    """Unaligned load of a vector of type vty at byte offset `off` from the i8* `base`."""
    p = builder.gep(base, [off])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)


def _xvec(builder, xp, idx):
    """<8 x float> from the float* xp at element index idx."""
    p = builder.gep(xp, [idx])
    return builder.load(builder.bitcast(p, V8F.as_pointer()), align=4)


def _vfma(builder, a, b, c):
    """a * b + c on <8 x float> (llvm.fma: one vfmadd with FMA3, fmla on AArch64). On a target
    without fused multiply-add (x86 before Haswell / Piledriver) llvm.fmuladd, a multiply and an
    add (llvm.fma would be a call to libm's fmaf per lane: decode 10x slower)."""
    mod = builder.module
    name = "llvm.fma.v8f32" if TARGET.fma else "llvm.fmuladd.v8f32"
    f = mod.globals.get(name)
    if f is None:
        f = ir.Function(mod, ir.FunctionType(V8F, [V8F, V8F, V8F]), name=name)
    return builder.call(f, [a, b, c])


def _decl(builder, name, ret, argtys):
    mod = builder.module
    f = mod.globals.get(name)
    if f is None:
        f = ir.Function(mod, ir.FunctionType(ret, argtys), name=name)
    return f


def _prefetch(builder, base, off):
    """Software prefetch of the cache line at byte `off` of `base` (read, keep in all levels)."""
    f = _decl(builder, "llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
    builder.call(f, [builder.gep(base, [off]), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _half_to_float(builder, h, hw=None):
    """f16 bits (i16 or <n x i16>) to float32 (or <n x float>), exactly. hw: fpext, which LLVM
    lowers to vcvtph2ps (F16C) or fcvt (AArch64) (default: where the target has it, TARGET.fp16);
    else in integer ops: LLVM's fallback is a call to __extendhfsf2, which Numba does not link
    (the call jumped to address 0)."""
    vec = isinstance(h.type, ir.VectorType)
    n = h.type.count if vec else 0
    hty = ir.VectorType(ir.HalfType(), n) if vec else ir.HalfType()
    if TARGET.fp16 if hw is None else hw:
        return builder.fpext(builder.bitcast(h, hty), ir.VectorType(F32, n) if vec else F32)
    ity = ir.VectorType(I32, n) if vec else I32
    fty = ir.VectorType(F32, n) if vec else F32
    k = (lambda v: ir.Constant(ity, [v] * n)) if vec else (lambda v: ir.Constant(I32, v))  # noqa: E731
    b = builder.zext(h, ity)
    sign = builder.shl(builder.and_(b, k(0x8000)), k(16))
    em = builder.and_(b, k(0x7FFF))
    # exponent and mantissa moved to float32's place and scaled by 2^112 (exact for normal and
    # subnormal halves alike); infinities and NaNs (exponent 31) get float32's 255, NaNs quieted
    # as vcvtph2ps does
    fin = builder.bitcast(builder.fmul(builder.bitcast(builder.shl(em, k(13)), fty),
                                       ir.Constant(fty, [2.0 ** 112] * n) if vec else ir.Constant(F32, 2.0 ** 112)), ity)
    nan = builder.select(builder.icmp_unsigned(">", em, k(0x7C00)), k(0x7FC00000), k(0x7F800000))
    special = builder.or_(nan, builder.shl(builder.and_(em, k(0x3FF)), k(13)))
    bits = builder.select(builder.icmp_unsigned(">=", em, k(0x7C00)), special, fin)
    return builder.bitcast(builder.or_(bits, sign), fty)


def _blk_f16(builder, wp, off, native=None):
    """The f16 at byte `off` of the i8* wp (a block's scale or Q4_1 min) as float32: read where
    the block is (no extra stream, no float32 copy); one vcvtph2ps with F16C. native: the x86 asm
    below (default: when compiling for x86 with F16C), else a plain two-byte load."""
    if not (TARGET.x86 and TARGET.f16c if native is None else native):
        return _half_to_float(builder, builder.load(builder.bitcast(builder.gep(wp, [off]), I16.as_pointer()), align=1))
    # on x86: four bytes loaded into a zeroed register (vmovd) and passed through an empty asm, so LLVM
    # cannot see that one lane is used: it otherwise narrows the load to two bytes as vpinsrw,
    # whose merge into a live register (often the accumulator) chained the loop's iterations
    # (1.1B q8_0 decode 35-40 % slower; every block of a block format has more than 4 bytes)
    v4 = ir.VectorType(I32, 4)
    p = builder.bitcast(builder.gep(wp, [off]), I32.as_pointer())
    v = builder.insert_element(ir.Constant(v4, [0] * 4), builder.load(p, align=1), ir.Constant(I32, 0))
    v = builder.asm(ir.FunctionType(v4, [v4]), "", "=x,0", [v], side_effect=False)
    h = builder.extract_element(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), ir.Constant(I32, 0))
    return builder.fpext(h, F32)


def _hsum(builder, v):
    s = builder.extract_element(v, ir.Constant(I32, 0))
    for i in range(1, 8):
        s = builder.fadd(s, builder.extract_element(v, ir.Constant(I32, i)))
    return s


def _block_vecs(builder, kind, base, boff):
    """The block at byte offset boff as four <8 x float> (unscaled quants or weights)."""
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    out = []
    if kind == KIND_Q8_0:
        for j in range(4):
            q = _vload(builder, base, builder.add(boff, c(2 + 8 * j)), ir.VectorType(I8, 8))
            out.append(builder.sitofp(q, V8F))
    elif kind in (KIND_Q4_0, KIND_Q4_1):
        # byte i of the 16 holds column i (low nibble) and column i + 16 (high nibble); each
        # 8-byte half is widened to <8 x i32> once (vpmovzxbd) and split with and / shift
        hdr = 2 if kind == KIND_Q4_0 else 4
        v8i = ir.VectorType(I32, 8)
        m15 = ir.Constant(v8i, [15] * 8)
        s4 = ir.Constant(v8i, [4] * 8)
        lo, hi = [], []
        for k in range(2):
            q = builder.zext(_vload(builder, base, builder.add(boff, c(hdr + 8 * k)), ir.VectorType(I8, 8)), v8i)
            lo.append(builder.sitofp(builder.and_(q, m15), V8F))
            hi.append(builder.sitofp(builder.lshr(q, s4), V8F))
        out = lo + hi             # columns 0-7, 8-15, 16-23, 24-31 (Q4_0's -8 is applied by the caller)
    else:
        for j in range(4):
            h = _vload(builder, base, builder.add(boff, c(16 * j)), ir.VectorType(I16, 8))
            if kind == KIND_F16:
                out.append(_half_to_float(builder, h))
            else:
                w = builder.shl(builder.zext(h, ir.VectorType(I32, 8)), ir.Constant(ir.VectorType(I32, 8), [16] * 8))
                out.append(builder.bitcast(w, V8F))
    return out


def _make(kind):
    bsize = {KIND_Q8_0: 34, KIND_Q4_0: 18, KIND_Q4_1: 20, KIND_F16: 64, KIND_BF16: 64}[kind]
    scaled = kind in (KIND_Q8_0, KIND_Q4_0, KIND_Q4_1)

    @intrinsic
    def kernel(typingctx, w, woff, rstride, nb, x, out, o0, nrows, xsum):
        sig = types.void(w, woff, rstride, nb, x, out, o0, nrows, xsum)

        def codegen(context, builder, signature, args):
            w_, woff_, rstride_, nb_, x_, out_, o0_, nrows_, xsum_ = args
            at = signature.args
            wp = builder.bitcast(context.make_array(at[0])(context, builder, w_).data, I8.as_pointer())
            xp = context.make_array(at[4])(context, builder, x_).data
            outp = context.make_array(at[5])(context, builder, out_).data
            xsp = context.make_array(at[8])(context, builder, xsum_).data
            accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(MAXR)]
            mins = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(MAXR)]
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            cases, end = _row_switch(builder, nrows_)
            for bb, nr in cases:
                with builder.goto_block(bb):
                    with cgutils.for_range(builder, nb_) as loop:
                        b = loop.index
                        xb = builder.mul(b, c(32))
                        xv = [_xvec(builder, xp, builder.add(xb, c(8 * j))) for j in range(4)]
                        for r in range(nr):
                            roff = builder.add(woff_, builder.mul(c(r), rstride_))
                            boff = builder.add(roff, builder.mul(b, c(bsize)))
                            qv = _block_vecs(builder, kind, wp, boff)
                            t = builder.fmul(qv[0], xv[0])
                            for j in range(1, 4):
                                t = _vfma(builder, qv[j], xv[j], t)
                            acc = builder.load(accs[r])
                            if scaled:
                                d = _blk_f16(builder, wp, boff)
                                dvec = builder.insert_element(ir.Constant(V8F, ir.Undefined), d, ir.Constant(I32, 0))
                                dvec = builder.shuffle_vector(dvec, dvec, ir.Constant(ir.VectorType(I32, 8), [0] * 8))
                                acc = _vfma(builder, dvec, t, acc)
                                if kind == KIND_Q4_1:     # + m * sum(x of the block)
                                    m = _blk_f16(builder, wp, builder.add(boff, c(2)))
                                    xs = builder.load(builder.gep(xsp, [b]))
                                    builder.store(builder.fadd(builder.load(mins[r]), builder.fmul(m, xs)), mins[r])
                                elif kind == KIND_Q4_0:   # - 8 * d * sum(x of the block)
                                    xs = builder.load(builder.gep(xsp, [b]))
                                    builder.store(builder.fadd(builder.load(mins[r]), builder.fmul(d, xs)), mins[r])
                            else:
                                acc = builder.fadd(acc, t)
                            builder.store(acc, accs[r])
                    for r in range(nr):
                        s = _hsum(builder, builder.load(accs[r]))
                        if kind == KIND_Q4_1:
                            s = builder.fadd(s, builder.load(mins[r]))
                        elif kind == KIND_Q4_0:
                            s = builder.fsub(s, builder.fmul(ir.Constant(F32, 8.0), builder.load(mins[r])))
                        builder.store(s, builder.gep(outp, [builder.add(o0_, c(r))]))
                    builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _bcast(builder, v):
    vec = builder.insert_element(ir.Constant(V8F, ir.Undefined), v, ir.Constant(I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(I32, 8), [0] * 8))


def _make_dequant(kind):
    """dequant(w, woff, nb, dst, doff): one row of nb blocks at byte woff to float32
    dst[doff:doff + 32*nb]."""
    bsize = {KIND_Q8_0: 34, KIND_Q4_0: 18, KIND_Q4_1: 20, KIND_F16: 64, KIND_BF16: 64}[kind]

    @intrinsic
    def dequant(typingctx, w, woff, nb, dst, doff):
        sig = types.void(w, woff, nb, dst, doff)

        def codegen(context, builder, signature, args):
            w_, woff_, nb_, dst_, doff_ = args
            at = signature.args
            wp = builder.bitcast(context.make_array(at[0])(context, builder, w_).data, I8.as_pointer())
            dp = context.make_array(at[3])(context, builder, dst_).data
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                boff = builder.add(woff_, builder.mul(b, c(bsize)))
                qv = _block_vecs(builder, kind, wp, boff)
                if kind in (KIND_Q8_0, KIND_Q4_0, KIND_Q4_1):
                    d = _blk_f16(builder, wp, boff)
                    if kind == KIND_Q4_1:
                        m = _blk_f16(builder, wp, builder.add(boff, c(2)))
                    elif kind == KIND_Q4_0:
                        m = builder.fmul(ir.Constant(F32, -8.0), d)
                    dv = _bcast(builder, d)
                    mv = _bcast(builder, m) if kind != KIND_Q8_0 else None
                    qv = [builder.fmul(dv, q) if mv is None else _vfma(builder, dv, q, mv) for q in qv]
                base = builder.add(doff_, builder.mul(b, c(32)))
                for j in range(4):
                    p = builder.gep(dp, [builder.add(base, c(8 * j))])
                    builder.store(qv[j], builder.bitcast(p, V8F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dequant


def _row_switch(builder, nrows, most=MAXR):
    """`switch nrows` with one block per count 1..most (the code is specialised per count);
    returns [(block, count)] and the join block."""
    fn = builder.function
    end = fn.append_basic_block("rows.end")
    cases = [(fn.append_basic_block(f"rows.{n}"), n) for n in range(1, most + 1)]
    sw = builder.switch(nrows, end)
    for bb, n in cases:
        sw.add_case(ir.Constant(nrows.type, n), bb)
    return cases, end


mv_q8_0 = _make(KIND_Q8_0)
mv_q4_0 = _make(KIND_Q4_0)
mv_q4_1 = _make(KIND_Q4_1)
mv_f16 = _make(KIND_F16)
mv_bf16 = _make(KIND_BF16)
dq_q8_0 = _make_dequant(KIND_Q8_0)
dq_q4_0 = _make_dequant(KIND_Q4_0)
dq_q4_1 = _make_dequant(KIND_Q4_1)
dq_f16 = _make_dequant(KIND_F16)
dq_bf16 = _make_dequant(KIND_BF16)


# --- row-range drivers (the signature of the scalar kernels in qmatmul.py) ----------------------
# out[o0 + r] = W[r] . x for r in [r0, r1). Long rows go four per pass (each load of x serves four
# rows); rows shorter than SHORT_ROW bytes go one per pass, which reads memory as one sequential
# stream: four interleaved short streams defeat the hardware prefetcher (measured on a
# 49152x576 Q8_0 output head from DRAM: 5.7 GB/s four per pass, 10.5 GB/s one per pass).

@njit(cache=True)
def _step(rs):
    return 1 if rs < SHORT_ROW else MAXR


@njit(cache=True)
def rows_q8_0(wu8, off, cols, x, out, o0, r0, r1):
    nb = cols // 32
    rs = nb * 34
    k = _step(rs)
    for r in range(r0, r1, k):
        mv_q8_0(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r), x)


@njit(cache=True)
def rows_q4_0(wu8, off, cols, x, xsum, out, o0, r0, r1):
    nb = cols // 32
    rs = nb * 18
    k = _step(rs)
    for r in range(r0, r1, k):
        mv_q4_0(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r), xsum)


@njit(cache=True)
def rows_q4_1(wu8, off, cols, x, xsum, out, o0, r0, r1):
    nb = cols // 32
    rs = nb * 20
    k = _step(rs)
    for r in range(r0, r1, k):
        mv_q4_1(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r), xsum)


@njit(cache=True)
def rows_16(wu8, off, cols, is_bf16, x, out, o0, r0, r1):
    """F16 / BF16 rows (cols a multiple of 32)."""
    nb = cols // 32
    rs = cols * 2
    k = _step(rs)
    for r in range(r0, r1, k):
        if is_bf16:
            mv_bf16(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r), x)
        else:
            mv_f16(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r), x)


@njit(cache=True)
def dequant_rows(wu8, kind, off, cols, r0, r1, dst):
    """dst[:r1-r0, :cols] = rows r0..r1 as float32 (dst C-contiguous, cols a multiple of 32);
    kind: KIND_* of this module."""
    nb = cols // 32
    flat = dst.reshape(-1)
    if kind == KIND_Q8_0:
        for r in range(r0, r1):
            dq_q8_0(wu8, off + r * nb * 34, nb, flat, (r - r0) * cols)
    elif kind == KIND_Q4_0:
        for r in range(r0, r1):
            dq_q4_0(wu8, off + r * nb * 18, nb, flat, (r - r0) * cols)
    elif kind == KIND_Q4_1:
        for r in range(r0, r1):
            dq_q4_1(wu8, off + r * nb * 20, nb, flat, (r - r0) * cols)
    elif kind == KIND_F16:
        for r in range(r0, r1):
            dq_f16(wu8, off + r * cols * 2, nb, flat, (r - r0) * cols)
    else:
        for r in range(r0, r1):
            dq_bf16(wu8, off + r * cols * 2, nb, flat, (r - r0) * cols)


# --- int8 activations (AVX2) ---------------------------------------------------------------------
# Like llama.cpp's q8 dot products: x is quantized per block of 32 to int8 (xq) with a float scale
# (xd), and a block's dot product is vpmaddubsw (u8 x s8 -> pairs of i16) + vpmaddwd (-> 8 x i32),
# converted once and scaled by d_w * d_x: about 9 instructions per 32 weights and row against 14-16
# for the float path. Used only when Numba compiles for an x86 CPU with AVX2 (HAVE_AVX2, from
# TARGET: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES or the host); the float kernels above serve the rest.
# The kernels are compiled on every target all the same (a caller such as qmatmul.matvec_group
# holds both paths): there the x86 intrinsics (_pmaddubsw, _pmaddwd, _psign, _hadd) are replaced
# by generic IR that computes the same bits.

HAVE_AVX2 = TARGET.avx2
# int8 kernels run one row per pass (one sequential stream) and prefetch PF_DIST bytes ahead:
# from DRAM, one thread, Q8_0 rows of 2048-5632 columns: ~10.5 GB/s without, 12-15 GB/s with
# (distances 2048-4096 measured best; 256-1024 did not help)
PF_DIST = 2048
V32B = ir.VectorType(I8, 32)
V16S = ir.VectorType(I16, 16)
V8I = ir.VectorType(I32, 8)


_EVEN16 = ir.Constant(ir.VectorType(I32, 16), list(range(0, 32, 2)))
_ODD16 = ir.Constant(ir.VectorType(I32, 16), list(range(1, 32, 2)))
_EVEN8 = ir.Constant(ir.VectorType(I32, 8), list(range(0, 16, 2)))
_ODD8 = ir.Constant(ir.VectorType(I32, 8), list(range(1, 16, 2)))


def _pmaddubsw(builder, u, s, native=None):
    """<16 x i16>: u[2i] * s[2i] + u[2i+1] * s[2i+1] with signed saturation, u unsigned and s
    signed bytes (<32 x i8>). vpmaddubsw when compiling for AVX2 (native: force either way)."""
    if TARGET.avx2 if native is None else native:
        return builder.call(_decl(builder, "llvm.x86.avx2.pmadd.ub.sw", V16S, [V32B, V32B]), [u, s])
    # each product fits in i16 (255 * -128 .. 255 * 127); only the pair's sum saturates
    prod = [builder.mul(builder.zext(builder.shuffle_vector(u, u, k), V16S),
                        builder.sext(builder.shuffle_vector(s, s, k), V16S)) for k in (_EVEN16, _ODD16)]
    return builder.call(_decl(builder, "llvm.sadd.sat.v16i16", V16S, [V16S, V16S]), prod)


def _pmaddwd(builder, a, b, native=None):
    """<8 x i32>: a[2i] * b[2i] + a[2i+1] * b[2i+1] of <16 x i16>, wrapping like vpmaddwd (only
    -32768^2 * 2 wraps). vpmaddwd when compiling for AVX2 (native: force either way)."""
    if TARGET.avx2 if native is None else native:
        return builder.call(_decl(builder, "llvm.x86.avx2.pmadd.wd", V8I, [V16S, V16S]), [a, b])
    prod = [builder.mul(builder.sext(builder.shuffle_vector(a, a, k), V8I),
                        builder.sext(builder.shuffle_vector(b, b, k), V8I)) for k in (_EVEN8, _ODD8)]
    return builder.add(*prod)


def _dot_u8s8(builder, u, s):
    """<8 x i32> pairwise sums of u (unsigned bytes) * s (signed bytes), as vpmaddubsw + vpmaddwd."""
    return _pmaddwd(builder, _pmaddubsw(builder, u, s), ir.Constant(V16S, [1] * 16))


def _i8_weights(builder, kind, wp, boff):
    """A block's quants as 32 unsigned bytes for vpmaddubsw, and (Q8_0) the signed quants, whose
    signs _i8_dot moves onto the activations (vpsignb)."""
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    if kind == KIND_Q8_0:
        wv = _vload(builder, wp, builder.add(boff, c(2)), V32B)
        aw = builder.call(_decl(builder, "llvm.abs.v32i8", V32B, [V32B, ir.IntType(1)]),
                          [wv, ir.Constant(ir.IntType(1), 0)])
        return aw, wv
    hdr = 2 if kind == KIND_Q4_0 else 4
    q = _vload(builder, wp, builder.add(boff, c(hdr)), ir.VectorType(I8, 16))
    lo = builder.and_(q, ir.Constant(ir.VectorType(I8, 16), [15] * 16))
    hi = builder.lshr(q, ir.Constant(ir.VectorType(I8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32)))), None


def _i8_dot(builder, aw, wv, xv):
    if wv is not None:
        xv = _psign(builder, xv, wv)
    return _dot_u8s8(builder, aw, xv)


def _i8_offset_term(builder, d, m, xsb, xcb):
    """Q4_1, per block: m * sum(x) + 8 d * (sum(x) - sum(xhat)), re-centring its unsigned quants
    so that the int8 rounding error multiplies q - 8 instead of q."""
    return builder.fadd(builder.fmul(m, xsb), builder.fmul(builder.fmul(ir.Constant(F32, 8.0), d), xcb))


def _q4_0_weights(builder, wp, boff):
    """Q4_0 quants for vpmaddubsw: the 16 bytes loaded into both halves of a ymm register (one
    broadcast load), the upper half shifted right by 4 (vpsrlvd) and all bytes masked to their
    low nibble: columns 0-15 then 16-31, with two vector ops where shift / insert / and took three
    (one of them on the shuffle unit, which the scale broadcast also needs)."""
    q = _vload(builder, wp, builder.add(boff, ir.Constant(I64, 2)), ir.VectorType(I8, 16))
    q = builder.bitcast(builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, 32), list(range(16)) * 2)), V8I)
    q = builder.lshr(q, ir.Constant(V8I, [0] * 4 + [4] * 4))
    return builder.and_(builder.bitcast(q, V32B), ir.Constant(V32B, [15] * 32))


def _hadd(builder, a, b, native=None):
    """vhaddps of two <8 x float>: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7];
    the intrinsic when compiling for AVX (native: force either way), else the same adds."""
    if TARGET.avx if native is None else native:
        return builder.call(_decl(builder, "llvm.x86.avx.hadd.ps.256", V8F, [V8F, V8F]), [a, b])
    i32x8 = ir.VectorType(I32, 8)
    return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(i32x8, [0, 2, 8, 10, 4, 6, 12, 14])),
                        builder.shuffle_vector(a, b, ir.Constant(i32x8, [1, 3, 9, 11, 5, 7, 13, 15])))


def _hsum2(builder, a, b):
    """(sum(a), sum(b)) of two <8 x float>: vhaddps, one 128-bit add, two shuffles and an add."""
    h = _hadd(builder, a, b)                # [a01 a23 b01 b23 | a45 a67 b45 b67]
    i32x4 = ir.VectorType(I32, 4)
    q = builder.fadd(builder.shuffle_vector(h, h, ir.Constant(i32x4, [0, 1, 2, 3])),
                     builder.shuffle_vector(h, h, ir.Constant(i32x4, [4, 5, 6, 7])))
    r = builder.fadd(builder.shuffle_vector(q, q, ir.Constant(i32x4, [0, 2, 0, 2])),
                     builder.shuffle_vector(q, q, ir.Constant(i32x4, [1, 3, 1, 3])))
    return builder.extract_element(r, ir.Constant(I32, 0)), builder.extract_element(r, ir.Constant(I32, 1))


def _make_i8(kind, nrows):
    """kernel(w, woff, rstride, nb, xq, xd, xs, out, o0): out[o0 + r] = the row of nb blocks at
    byte woff + r * rstride of w times x quantized to int8 (quantize_x), for r < nrows (1 or 2).
    xd: LANES scales per block (one per 4 values).
    xs: for Q4_0 the int32 offset vectors of quantize_x (8 per block, stored in the float32
    array's bytes), for Q4_1 the block sums of x and sum(x) - sum(xhat) (2 * nb floats).
    A block is about 3.5 cycles of work but the accumulating fma has 4 of latency, so there are
    always two accumulator chains: one row alternates its blocks between two; two rows (short
    ones: SmolLM2's 576 columns are 18 blocks, and a row's fixed costs of loop entry, horizontal
    sum and store weighed) take one each and share each block's activations, offsets and d_x."""
    bsize = {KIND_Q8_0: 34, KIND_Q4_0: 18, KIND_Q4_1: 20}[kind]

    @intrinsic
    def kernel(typingctx, w, woff, rstride, nb, xq, xd, xs, out, o0):
        sig = types.void(w, woff, rstride, nb, xq, xd, xs, out, o0)

        def codegen(context, builder, signature, args):
            w_, woff_, rstride_, nb_, xq_, xd_, xs_, out_, o0_ = args
            at = signature.args
            wp = builder.bitcast(context.make_array(at[0])(context, builder, w_).data, I8.as_pointer())
            xqp = builder.bitcast(context.make_array(at[4])(context, builder, xq_).data, I8.as_pointer())
            xdp = context.make_array(at[5])(context, builder, xd_).data
            xsp = context.make_array(at[6])(context, builder, xs_).data
            xop = builder.bitcast(xsp, I8.as_pointer())
            outp = context.make_array(at[7])(context, builder, out_).data
            accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(2)]
            mins = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(2)]
            c = lambda v: ir.Constant(I64, v)  # noqa: E731

            def x_of(b):
                """Block b's activations, Q4_0 offsets and d_x."""
                xo = _vload(builder, xop, builder.mul(b, c(32)), V8I) if kind == KIND_Q4_0 else None
                return _vload(builder, xqp, builder.mul(b, c(32)), V32B), xo, _xvec(builder, xdp, builder.mul(b, c(LANES)))

            def block(b, row, a, xv, xo, dx, pf=True):
                """Accumulate block b of row `row` into accumulator a (pf: prefetch ahead of it)."""
                boff = builder.add(builder.add(woff_, builder.mul(c(row), rstride_)), builder.mul(b, c(bsize)))
                if PF_DIST and pf:
                    _prefetch(builder, wp, builder.add(boff, c(PF_DIST)))
                if kind == KIND_Q4_0:
                    # dot(q - 8, x) = dot(q, x) - 8 * (sums of x per lane), the latter precomputed
                    dot = builder.sub(_dot_u8s8(builder, _q4_0_weights(builder, wp, boff), xv), xo)
                else:
                    aw, neg = _i8_weights(builder, kind, wp, boff)
                    dot = _i8_dot(builder, aw, neg, xv)
                d = _blk_f16(builder, wp, boff)
                # lane l of dot is the sum of 4 products, whose x share the scale dx[l]
                acc = _vfma(builder, builder.fmul(_bcast(builder, d), dx), builder.sitofp(dot, V8F),
                            builder.load(accs[a]))
                builder.store(acc, accs[a])
                if kind == KIND_Q4_1:
                    m = _blk_f16(builder, wp, builder.add(boff, c(2)))
                    xsb = builder.load(builder.gep(xsp, [b]))
                    xcb = builder.load(builder.gep(xsp, [builder.add(b, nb_)]))
                    term = _i8_offset_term(builder, d, m, xsb, xcb)
                    builder.store(builder.fadd(builder.load(mins[a]), term), mins[a])

            if nrows == 1:
                with cgutils.for_range(builder, builder.ashr(nb_, c(1))) as loop:
                    b = builder.mul(loop.index, c(2))
                    block(b, 0, 0, *x_of(b))
                    b1 = builder.add(b, c(1))
                    # one prefetch per pair of blocks where a pair is within a cache line's
                    # length (Q4: 36 / 40 bytes; every line is still touched): a load-port uop
                    # and an instruction less per two blocks of a compute-bound loop
                    block(b1, 0, 1, *x_of(b1), pf=2 * bsize > 64)
                with builder.if_then(builder.icmp_signed("!=", builder.and_(nb_, c(1)), c(0))):
                    b = builder.sub(nb_, c(1))
                    block(b, 0, 0, *x_of(b))
                res = _hsum(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1])))
                if kind == KIND_Q4_1:
                    res = builder.fadd(res, builder.fadd(builder.load(mins[0]), builder.load(mins[1])))
                sums = [res]
            else:
                with cgutils.for_range(builder, nb_) as loop:
                    xb = x_of(loop.index)
                    for r in range(2):
                        block(loop.index, r, r, *xb)
                sums = list(_hsum2(builder, builder.load(accs[0]), builder.load(accs[1])))
                if kind == KIND_Q4_1:
                    sums = [builder.fadd(v, builder.load(mins[r])) for r, v in enumerate(sums)]
            for r, v in enumerate(sums):
                builder.store(v, builder.gep(outp, [builder.add(o0_, c(r))]))
            return context.get_dummy_value()

        return sig, codegen

    return kernel


mvi_q8_0 = _make_i8(KIND_Q8_0, 1)
mvi_q4_0 = _make_i8(KIND_Q4_0, 1)
mvi_q4_1 = _make_i8(KIND_Q4_1, 1)
mvi2_q8_0 = _make_i8(KIND_Q8_0, 2)
mvi2_q4_0 = _make_i8(KIND_Q4_0, 2)
mvi2_q4_1 = _make_i8(KIND_Q4_1, 2)

PAIR_BYTES = 512     # rows of at most this many bytes run two per pass (rows_i8)
XS_PER_BLOCK = 10    # floats of the xs scratch per block of x: 8 (Q4_0 offsets) + 2 (Q4_1 sums)
# int8 activations carry one scale per 4 values (LANES per block of 32), not one per block: the
# int32 lanes of vpmaddwd each sum 4 products, so a lane's scale costs a vector multiply where a
# block's was a broadcast. LLM activations have outlier channels: in SmolLM2's attention and FFN
# inputs most blocks of 32 hold one value carrying nearly all of the block (max/rms 5.6 of at most
# sqrt(32) = 5.66), and one scale per block gave the other 31 values a step of outlier/127 (the
# logits moved by 1-5, flipping near ties such as the first token of a chat reply; llama.cpp, one
# scale per block, shows the same). Per 4 values only the outlier's own lane is coarse.
LANES = 8


@njit(cache=True, inline="always")
def _quantize4(v, i0, xq):
    """v[i0:i0+4] to int8 in xq[i0:i0+4] with one scale, amax/127 (one lane of vpmaddwd's); returns
    (the scale, the sum of the int8 values, the sum of the values)."""
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
        xq[i0 + i] = q
        ls += q
    return d, ls, s


@njit(cache=True)
def quantize_x(x, xq, xd, xs):
    """x (float32, n a multiple of 32) -> xq int8 with a scale per 4 values in xd (LANES per
    block: amax/127 of x[32b + 4l: 32b + 4l + 4] at xd[LANES * b + l]), and in xs (XS_PER_BLOCK *
    nb floats) the kernels' per-block terms: first Q4_0's offsets, int32 (in the floats' bytes)
    8 * sum(xq[32b + 4l: 32b + 4l + 4]) for lane l of block b (the lanes of vpmaddwd), then for
    Q4_1 sum(x) per block and sum(x) - sum(xhat) per block (xhat: x as the int8 values stand
    for it, xd[lane] * xq)."""
    nb = x.shape[0] // 32
    xo = xs[:8 * nb].view(np.int32)
    for b in range(nb):
        s = np.float32(0.0)
        sh = np.float32(0.0)
        for lane in range(LANES):
            d, ls, s4 = _quantize4(x, b * 32 + 4 * lane, xq)
            s += s4
            xo[b * 8 + lane] = 8 * ls
            xd[b * LANES + lane] = d
            sh += d * np.float32(ls)
        xs[8 * nb + b] = s
        xs[9 * nb + b] = s - sh


@njit(cache=True)
def rows_i8(kind, wu8, off, cols, xq, xd, xs, out, o0, r0, r1):
    """Like rows_q8_0/rows_q4_0/rows_q4_1 on int8 activations (xq, xd, xs from quantize_x). Rows
    of at most PAIR_BYTES go two per pass, longer ones one per pass (one sequential stream,
    prefetched PF_DIST ahead). Measured on decode from DRAM: two interleaved rows of 612 bytes
    (SmolLM2 q8_0) ran 25 % slower, of 1152 bytes (1.1B q4_0) 17 % slower, while two 324-byte
    rows (SmolLM2 q4_0: 18 blocks, whose fixed costs a row weighed) gained 6-7 %."""
    nb = cols // 32
    bs = 34 if kind == KIND_Q8_0 else (18 if kind == KIND_Q4_0 else 20)
    rs = nb * bs
    r2 = r0 + (r1 - r0) // 2 * 2 if rs <= PAIR_BYTES else r0
    if kind == KIND_Q8_0:
        for r in range(r0, r2, 2):
            mvi2_q8_0(wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)
        for r in range(r2, r1):
            mvi_q8_0(wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)
    elif kind == KIND_Q4_0:
        for r in range(r0, r2, 2):
            mvi2_q4_0(wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)
        for r in range(r2, r1):
            mvi_q4_0(wu8, off + r * rs, rs, nb, xq, xd, xs, out, o0 + r)
    else:
        xs1 = xs[8 * nb:]
        for r in range(r0, r2, 2):
            mvi2_q4_1(wu8, off + r * rs, rs, nb, xq, xd, xs1, out, o0 + r)
        for r in range(r2, r1):
            mvi_q4_1(wu8, off + r * rs, rs, nb, xq, xd, xs1, out, o0 + r)


# --- several tokens at once (prefill) -------------------------------------------------------------
# Each block of a weight row is loaded and unpacked once and multiplied with up to MAXT tokens'
# int8 activations, one <8 x float> accumulator per token. The per-block sums of the tokens (Q4
# offset terms) sit in `xg` as vectors of MAXT tokens, so that one fma gives all MAXT offset
# terms; per token and block the work is the dot product (Q8_0: vpsignb, vpmaddubsw, vpmaddwd),
# vcvtdq2ps, one vmulps of d_w by the token's LANES scales (from memory) and one fma.
# (The first version did the scalar work per token: about 1.5x slower.)

MAXT = 8
# xg fields (quantize_rows): per token group and block, vectors of the MAXT tokens' sum(xhat),
# sum(x) and sum(x) - sum(xhat), then for token t of the group (field XG_L + t) its LANES scales
XG_SQ, XG_S, XG_C, XG_L = range(4)
XG_FIELDS = XG_L + MAXT


def _psign(builder, x, w, native=None):
    """x with the signs of w (vpsignb: -x where w < 0, 0 where w == 0; -(-128) wraps to -128), on
    <32 x i8>. vpsignb when compiling for AVX2 (native: force either way)."""
    if TARGET.avx2 if native is None else native:
        return builder.call(_decl(builder, "llvm.x86.avx2.psign.b", V32B, [V32B, V32B]), [x, w])
    zero = ir.Constant(V32B, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, x), x)
    return builder.select(builder.icmp_signed("==", w, zero), zero, neg)


def _hsum8(builder, vs):
    """[sum(vs[0]), ..., sum(vs[7])] for eight <8 x float>: six vhaddps, two lane permutes, an add."""
    h = [_hadd(builder, vs[i], vs[i + 1]) for i in range(0, 8, 2)]
    a = _hadd(builder, h[0], h[1])           # [s0lo s1lo s2lo s3lo | s0hi s1hi s2hi s3hi]
    b = _hadd(builder, h[2], h[3])           # the same for vs[4:8]
    i32x8 = ir.VectorType(I32, 8)
    lo = builder.shuffle_vector(a, b, ir.Constant(i32x8, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(a, b, ir.Constant(i32x8, [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.fadd(lo, hi)


def _make_i8_multi(kind):
    bsize = {KIND_Q8_0: 34, KIND_Q4_0: 18, KIND_Q4_1: 20}[kind]

    @intrinsic
    def kernel(typingctx, w, woff, nb, b0, nbk, xq, xg, g, ntok, out, orow, ocol):
        """Blocks b0..b0+nbk of the row at byte woff (nb blocks) times tokens 8g..8g+ntok, added to
        out[orow + t, ocol] for t < ntok. xq int8 (n, 32*nb); xg float32 (ceil(n/8), XG_FIELDS, nb, 8):
        per token group, field and block the MAXT tokens' sum(xhat), sum(x), sum(x) - sum(xhat),
        then each token's LANES scales (quantize_rows)."""
        sig = types.void(w, woff, nb, b0, nbk, xq, xg, g, ntok, out, orow, ocol)

        def codegen(context, builder, signature, args):
            w_, woff_, nb_, b0_, nbk_, xq_, xg_, g_, ntok_, out_, orow_, ocol_ = args
            at = signature.args
            arr = lambda i, v: context.make_array(at[i])(context, builder, v)  # noqa: E731
            wp = builder.bitcast(arr(0, w_).data, I8.as_pointer())
            xqp = builder.bitcast(arr(5, xq_).data, I8.as_pointer())
            xgp = arr(6, xg_).data
            oa = arr(9, out_)
            outp = oa.data
            ocols = builder.extract_value(oa.shape, 1)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(MAXT)]
            offs = cgutils.alloca_once_value(builder, ZERO8)
            cols = builder.mul(nb_, c(32))
            t0 = builder.mul(g_, c(MAXT))
            gbase = builder.mul(builder.mul(g_, c(XG_FIELDS)), nb_)  # xg[g, 0, 0, 0] / MAXT

            def xgv(field, b):
                return _xvec(builder, xgp, builder.mul(builder.add(builder.add(gbase, builder.mul(c(field), nb_)), b),
                                                       c(MAXT)))
            cases, end = _row_switch(builder, ntok_, MAXT)
            for bb, nt in cases:
                with builder.goto_block(bb):
                    with cgutils.for_range(builder, nbk_) as loop:
                        b = builder.add(b0_, loop.index)
                        boff = builder.add(woff_, builder.mul(b, c(bsize)))
                        _prefetch(builder, wp, builder.add(boff, c(PF_DIST)))
                        d = _blk_f16(builder, wp, boff)
                        aw, wv = _i8_weights(builder, kind, wp, boff)
                        dv = _bcast(builder, d)
                        for t in range(nt):
                            xo = builder.add(builder.mul(builder.add(t0, c(t)), cols), builder.mul(b, c(32)))
                            dot = _i8_dot(builder, aw, wv, _vload(builder, xqp, xo, V32B))
                            st = builder.fmul(dv, xgv(XG_L + t, b))     # d_w * the token's lane scales
                            builder.store(_vfma(builder, st, builder.sitofp(dot, V8F), builder.load(accs[t])), accs[t])
                        if kind == KIND_Q4_0:       # d_w * sum(xhat), times -8 at the end
                            builder.store(_vfma(builder, dv, xgv(XG_SQ, b), builder.load(offs)), offs)
                        elif kind == KIND_Q4_1:     # m * sum(x) + 8 d * (sum(x) - d_x * sum(xq)), see _i8_offset_term
                            m = _blk_f16(builder, wp, builder.add(boff, c(2)))
                            o = _vfma(builder, _bcast(builder, m), xgv(XG_S, b), builder.load(offs))
                            o = _vfma(builder, _bcast(builder, builder.fmul(ir.Constant(F32, 8.0), d)), xgv(XG_C, b), o)
                            builder.store(o, offs)
                    # the MAXT sums as one vector (a vhaddps tree: a third of the horizontal sums'
                    # work, which the short rows of small models felt), then the offset terms
                    res = _hsum8(builder, [builder.load(a) for a in accs])
                    ov = builder.load(offs)
                    if kind == KIND_Q4_0:
                        res = builder.fsub(res, builder.fmul(_bcast(builder, ir.Constant(F32, 8.0)), ov))
                    elif kind == KIND_Q4_1:
                        res = builder.fadd(res, ov)
                    first = builder.icmp_signed("==", b0_, c(0))
                    for t in range(nt):
                        v = builder.extract_element(res, ir.Constant(I32, t))
                        oi = builder.add(builder.mul(builder.add(orow_, c(t)), ocols), ocol_)
                        op = builder.gep(outp, [oi])
                        # the first column slice stores, later ones add
                        builder.store(builder.select(first, v, builder.fadd(builder.load(op), v)), op)
                    builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


mmi_q8_0 = _make_i8_multi(KIND_Q8_0)
mmi_q4_0 = _make_i8_multi(KIND_Q4_0)
mmi_q4_1 = _make_i8_multi(KIND_Q4_1)


@njit(cache=True)
def _quantize_row(v, xq, t, xg, exact):
    """Row t of the prompt's int8 activations from the float32 values v (cols,): xq[t] and token
    t's fields of xg (see quantize_rows); exact: whether sum(x) is v's own (False: v is the
    residual of the row before, whose exact sums that row already carries)."""
    g, tl = t // MAXT, t % MAXT
    xr = xq[t]
    for b in range(v.shape[0] // 32):
        s = np.float32(0.0)
        sh = np.float32(0.0)
        for lane in range(LANES):
            d, ls, s4 = _quantize4(v, b * 32 + 4 * lane, xr)
            s += s4
            xg[g, XG_L + tl, b, lane] = d
            sh += d * np.float32(ls)
        if not exact:
            s = np.float32(0.0)
        xg[g, XG_SQ, b, tl] = sh
        xg[g, XG_S, b, tl] = s
        xg[g, XG_C, b, tl] = s - sh


@njit(cache=True)
def quantize_rows(h, xq, xg, resid):
    """Rows of h (n, cols) to int8 with a scale per 4 values (as quantize_x): xq (n, cols) and in
    xg (ceil(n/MAXT), XG_FIELDS, nb, MAXT) the per-block terms, token t at [t // MAXT, field,
    block, t % MAXT]: sum(xhat), sum(x), sum(x) - sum(xhat) (xhat: the values the int8 stand for),
    and its LANES scales at [t // MAXT, XG_L + t % MAXT, block, :] (see the kernels above).
    resid: also row n (xq and xg have room for n + 1 rows), the int8 quantization of what row
    n - 1's int8 values miss (h[n-1] - xhat): the matmul's rows n - 1 and n added give that
    token's product to about float precision (the int8 error squared)."""
    n, cols = h.shape
    # one thread: a parallel loop's compilation (parfors) cost a first run ~3 s, and the work is
    # a few % of the matmul's that follows (1.1B, 128 tokens x 5632: ~1 ms)
    for t in range(n):
        _quantize_row(h[t], xq, t, xg, True)
    if resid:
        r = np.empty(cols, np.float32)
        g, tl = (n - 1) // MAXT, (n - 1) % MAXT
        for i in range(cols):
            r[i] = h[n - 1, i] - np.float32(xq[n - 1, i]) * xg[g, XG_L + tl, i // 32, (i % 32) // 4]
        _quantize_row(r, xq, n, xg, False)


# qmatmul.matmul_i8_group's work: tasks of rows (about 8 per thread, each task's rows of one column slice within
# MM_ROW_BYTES so they stay in L2 while every token group passes) x column slices of MM_KB blocks
# (8 tokens' int8 activations of a slice, 16 KiB, stay in L1 while the rows pass)
MM_ROW_BYTES = 128 * 1024
MM_KB = 64


@njit(cache=True)
def mm_rows_per_task(rows, cols, kind, n_threads):
    """Rows per task of qmatmul.matmul_i8_group: about 8 tasks per thread, the task's rows of one column slice
    within MM_ROW_BYTES, a multiple of 16 (tasks write whole 64-byte lines of out: shared lines
    ping-pong between the cores)."""
    bs = 34 if kind == KIND_Q8_0 else (18 if kind == KIND_Q4_0 else 20)
    kb = min(cols // 32, MM_KB)
    per_thread = (rows + 8 * n_threads - 1) // (8 * n_threads)
    return max(16, min(64, MM_ROW_BYTES // (kb * bs), per_thread) // 16 * 16)


@njit(cache=True)
def mm_rows(kind, wu8, off, cols, xq, xg, out, ocol, r0, r1):
    """out[:, ocol + r] = x @ W[r] for rows r0 <= r < r1 of a Q8_0/Q4_0/Q4_1 matrix (one task of
    qmatmul.matmul_i8_group): column slices of MM_KB blocks, within a slice MAXT tokens at a time."""
    nb = cols // 32
    n = xq.shape[0]
    bs = 34 if kind == KIND_Q8_0 else (18 if kind == KIND_Q4_0 else 20)
    rs = nb * bs
    kb = min(nb, MM_KB)
    for b0 in range(0, nb, kb):
        nbk = min(kb, nb - b0)
        for g in range((n + MAXT - 1) // MAXT):
            nt = min(MAXT, n - g * MAXT)
            for r in range(r0, r1):
                if kind == KIND_Q8_0:
                    mmi_q8_0(wu8, off + r * rs, nb, b0, nbk, xq, xg, g, nt, out, g * MAXT, ocol + r)
                elif kind == KIND_Q4_0:
                    mmi_q4_0(wu8, off + r * rs, nb, b0, nbk, xq, xg, g, nt, out, g * MAXT, ocol + r)
                else:
                    mmi_q4_1(wu8, off + r * rs, nb, b0, nbk, xq, xg, g, nt, out, g * MAXT, ocol + r)
