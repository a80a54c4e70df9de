"""LLVM vector IR (Numba intrinsics): the pieces every kernel is built from, and the F16/BF16
matvec and dequantization kernels. The block formats' kernels (Q8_0 ... IQ4_XS) are generated
from their definitions in blockir.py out of these pieces.

Numba's scalar code cannot keep SIMD accumulators across the blocks of a row: LLVM vectorizes the
32 products of a block as a reduction and pays a horizontal sum per row and block, which held the
scalar kernels to ~8 GB/s. Here each group of 32 columns is handled with explicit <8 x float>
vectors,

    t   = sum_j float(q[8j:8j+8]) * x[8j:8j+8]        (4 fused multiply-adds, j = 0..3)
    acc = fma(broadcast(scale), t, acc)                (no horizontal sum per group)

and the eight lanes of `acc` are summed once per row. The IR is generic where it can be: LLVM
lowers it for the host CPU (vpmovsxbd/vcvtdq2ps/vfmadd on AVX2, vcvtph2ps for F16 with F16C, NEON
on ARM); the x86 intrinsics below (vpmaddubsw, vpmaddwd, vpsignb, vhaddps, vpshufb) are emitted
only when compiling for a CPU that has them, and written as generic IR computing the same bits
elsewhere. Scales are read where they are, in the blocks (a float32 copy cost a second memory
stream in decode and its size in RAM).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import isa
from .isa import FM

# the CPU Numba compiles for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host): whether the x86
# intrinsics and asm below may be emitted; elsewhere the same computation is written as generic IR
TARGET = isa.target()

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V8F = ir.VectorType(F32, 8)
ZERO8 = ir.Constant(V8F, [0.0] * 8)

KIND_F16, KIND_BF16 = range(2)
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


def _blk_f16(builder, wp, off, native=None, lane=0):
    """The f16 at byte `off` of the i8* wp (a block's scale or Q4_1 min) as float32: read where
    the block is (no extra stream, no float32 copy); one vcvtph2ps with F16C. native: the x86 asm
    below (default: when compiling for x86 with F16C), else a plain two-byte load."""
    if not (TARGET.x86 and TARGET.f16c if native is None else native):
        if lane:
            off = builder.add(off, ir.Constant(off.type, 2 * lane))
        return _half_to_float(builder, builder.load(builder.bitcast(builder.gep(wp, [off]), I16.as_pointer()), align=1))
    # on x86: four bytes loaded into a zeroed register (vmovd) and passed through an empty asm, so LLVM
    # cannot see that one lane is used: it otherwise narrows the load to two bytes as vpinsrw,
    # whose merge into a live register (often the accumulator) chained the loop's iterations
    # (1.1B q8_0 decode 35-40 % slower; every block of a block format has more than 4 bytes)
    v4 = ir.VectorType(I32, 4)
    p = builder.bitcast(builder.gep(wp, [off]), I32.as_pointer())
    v = builder.insert_element(ir.Constant(v4, [0] * 4), builder.load(p, align=1), ir.Constant(I32, 0))
    v = builder.asm(ir.FunctionType(v4, [v4]), "", "=x,0", [v], side_effect=False)
    h = builder.extract_element(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), ir.Constant(I32, lane))
    return builder.fpext(h, F32)


def _hsum(builder, v):
    s = builder.extract_element(v, ir.Constant(I32, 0))
    for i in range(1, 8):
        s = builder.fadd(s, builder.extract_element(v, ir.Constant(I32, i)))
    return s


def _block_vecs(builder, kind, base, boff):
    """32 F16 or BF16 weights at byte offset boff as four <8 x float>."""
    out = []
    for j in range(4):
        h = _vload(builder, base, builder.add(boff, ir.Constant(I64, 16 * j)), ir.VectorType(I16, 8))
        if kind == KIND_F16:
            out.append(_half_to_float(builder, h))
        else:
            w = builder.shl(builder.zext(h, ir.VectorType(I32, 8)), ir.Constant(ir.VectorType(I32, 8), [16] * 8))
            out.append(builder.bitcast(w, V8F))
    return out


def _make(kind):
    """kernel(w, woff, rstride, nb, x, out, o0, nrows): nrows (1..MAXR) F16/BF16 rows of nb groups
    of 32 columns times x."""

    @intrinsic
    def kernel(typingctx, w, woff, rstride, nb, x, out, o0, nrows):
        sig = types.void(w, woff, rstride, nb, x, out, o0, nrows)

        def codegen(context, builder, signature, args):
            w_, woff_, rstride_, nb_, x_, out_, o0_, nrows_ = args
            at = signature.args
            wp = builder.bitcast(context.make_array(at[0])(context, builder, w_).data, I8.as_pointer())
            xp = context.make_array(at[4])(context, builder, x_).data
            outp = context.make_array(at[5])(context, builder, out_).data
            accs = [cgutils.alloca_once_value(builder, ZERO8) for _ in range(MAXR)]
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
                            qv = _block_vecs(builder, kind, wp, builder.add(roff, builder.mul(b, c(64))))
                            t = builder.fmul(qv[0], xv[0])
                            for j in range(1, 4):
                                t = _vfma(builder, qv[j], xv[j], t)
                            builder.store(builder.fadd(builder.load(accs[r]), t), accs[r])
                    for r in range(nr):
                        s = _hsum(builder, builder.load(accs[r]))
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
    """dequant(w, woff, nb, dst, doff): one F16/BF16 row of nb groups of 32 at byte woff to
    float32 dst[doff:doff + 32*nb]."""

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
                qv = _block_vecs(builder, kind, wp, builder.add(woff_, builder.mul(b, c(64))))
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


mv_f16 = _make(KIND_F16)
mv_bf16 = _make(KIND_BF16)
dq_f16 = _make_dequant(KIND_F16)
dq_bf16 = _make_dequant(KIND_BF16)


# --- row-range drivers (the signature of the scalar kernels in qmatmul.py) ----------------------
# out[o0 + r] = W[r] . x for r in [r0, r1). Long rows go four per pass (each load of x serves four
# rows); rows shorter than SHORT_ROW bytes go one per pass, which reads memory as one sequential
# stream: four interleaved short streams defeat the hardware prefetcher (measured on a
# 49152x576 Q8_0 output head from DRAM: 5.7 GB/s four per pass, 10.5 GB/s one per pass).

@njit(fastmath=False, cache=True)
def _step(rs):
    return 1 if rs < SHORT_ROW else MAXR


@njit(fastmath=FM, cache=True)
def rows_16(wu8, off, cols, is_bf16, x, out, o0, r0, r1):
    """F16 / BF16 rows (cols a multiple of 32)."""
    nb = cols // 32
    rs = cols * 2
    k = _step(rs)
    for r in range(r0, r1, k):
        if is_bf16:
            mv_bf16(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r))
        else:
            mv_f16(wu8, off + r * rs, rs, nb, x, out, o0 + r, min(k, r1 - r))


@njit(fastmath=FM, cache=True)
def dequant_rows(wu8, kind, off, cols, r0, r1, dst):
    """dst[:r1-r0, :cols] = F16 (kind KIND_F16) or BF16 rows r0..r1 as float32 (dst C-contiguous,
    cols a multiple of 32)."""
    nb = cols // 32
    flat = dst.reshape(-1)
    if kind == KIND_F16:
        for r in range(r0, r1):
            dq_f16(wu8, off + r * cols * 2, nb, flat, (r - r0) * cols)
    else:
        for r in range(r0, r1):
            dq_bf16(wu8, off + r * cols * 2, nb, flat, (r - r0) * cols)


# --- int8 activations (AVX2) ---------------------------------------------------------------------
# Like llama.cpp's q8 dot products: x is quantized to int8 (xq) with float scales (xd), and a
# group's dot product is vpmaddubsw (u8 x s8 -> pairs of i16) + vpmaddwd (-> 8 x i32), converted
# once and scaled: about 9 instructions per 32 weights and row against 14-16 for the float path. Used only when Numba compiles for an x86 CPU with AVX2 (HAVE_AVX2, from
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


_QUAD = [ir.Constant(ir.VectorType(I32, 8), list(range(k, 32, 4))) for k in range(4)]


def _dpbusd(builder, acc, u, s, native=None):
    """<8 x i32>: acc[i] + u[4i] * s[4i] + ... + u[4i+3] * s[4i+3] (u unsigned, s signed bytes,
    <32 x i8>; no saturation, the sum wraps like vpdpbusd). vpdpbusd when compiling for a CPU with
    VNNI on ymm (native: force either way), else the same in i32 arithmetic."""
    if TARGET.vnni if native is None else native:
        f = _decl(builder, "llvm.x86.avx512.vpdpbusd.256", V8I, [V8I, V8I, V8I])
        return builder.call(f, [acc, builder.bitcast(u, V8I), builder.bitcast(s, V8I)])
    q = [builder.mul(builder.zext(builder.shuffle_vector(u, u, k), V8I),
                     builder.sext(builder.shuffle_vector(s, s, k), V8I)) for k in _QUAD]
    return builder.add(acc, builder.add(builder.add(q[0], q[1]), builder.add(q[2], q[3])))


def _dpwssd(builder, acc, a, b, native=None):
    """<8 x i32>: acc + vpmaddwd(a, b) (a, b <16 x i16>; wraps): one vpdpwssd on a CPU with VNNI
    on ymm (native: force either way), else vpmaddwd + vpaddd (or their generic IR)."""
    if TARGET.vnni if native is None else native:
        f = _decl(builder, "llvm.x86.avx512.vpdpwssd.256", V8I, [V8I, V8I, V8I])
        return builder.call(f, [acc, builder.bitcast(a, V8I), builder.bitcast(b, V8I)])
    return builder.add(acc, _pmaddwd(builder, a, b, native=False if native is False else None))


def _dot_u8s8(builder, u, s):
    """<8 x i32> sums of 4 products of u (unsigned bytes) * s (signed bytes): one vpdpbusd with
    VNNI, else vpmaddubsw + vpmaddwd, which equal it while no pair of products leaves int16
    (every format's |q| * 127 * 2 <= 32512)."""
    if TARGET.vnni:
        return _dpbusd(builder, ir.Constant(V8I, [0] * 8), u, s)
    return _pmaddwd(builder, _pmaddubsw(builder, u, s), ir.Constant(V16S, [1] * 16))


def _hadd(builder, a, b, native=None):
    """vhaddps / vphaddd of two <8 x float> / <8 x i32>: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7,
    b4+b5, b6+b7] (integers wrap); the intrinsic when compiling for AVX (floats) or AVX2 (integers)
    (native: force either way), else the same adds."""
    ints = a.type == V8I
    if (TARGET.avx2 if ints else TARGET.avx) if native is None else native:
        name, ty = ("llvm.x86.avx2.phadd.d", V8I) if ints else ("llvm.x86.avx.hadd.ps.256", V8F)
        return builder.call(_decl(builder, name, ty, [ty, ty]), [a, b])
    i32x8 = ir.VectorType(I32, 8)
    return (builder.add if ints else builder.fadd)(
        builder.shuffle_vector(a, b, ir.Constant(i32x8, [0, 2, 8, 10, 4, 6, 12, 14])),
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


# prefill (blockir.mm_i8): tokens per pass over a weight row's blocks
MAXT = 8


def _psign(builder, x, w, native=None):
    """x with the signs of w (vpsignb: -x where w < 0, 0 where w == 0; -(-128) wraps to -128), on
    <32 x i8>. vpsignb when compiling for AVX2 (native: force either way)."""
    if TARGET.avx2 if native is None else native:
        return builder.call(_decl(builder, "llvm.x86.avx2.psign.b", V32B, [V32B, V32B]), [x, w])
    zero = ir.Constant(V32B, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, x), x)
    return builder.select(builder.icmp_signed("==", w, zero), zero, neg)


def _hsum8(builder, vs):
    """[sum(vs[0]), ..., sum(vs[7])] for eight <8 x float> or <8 x i32> (wrapping): six vhaddps /
    vphaddd, two lane permutes, an add."""
    h = [_hadd(builder, vs[i], vs[i + 1]) for i in range(0, 8, 2)]
    a = _hadd(builder, h[0], h[1])           # [s0lo s1lo s2lo s3lo | s0hi s1hi s2hi s3hi]
    b = _hadd(builder, h[2], h[3])           # the same for vs[4:8]
    i32x8 = ir.VectorType(I32, 8)
    lo = builder.shuffle_vector(a, b, ir.Constant(i32x8, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(a, b, ir.Constant(i32x8, [4, 5, 6, 7, 12, 13, 14, 15]))
    return (builder.add if lo.type == V8I else builder.fadd)(lo, hi)


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """Atomically arr[i] += v (int64 array); returns the value before (an atomicrmw add: lock xadd
    on x86, ldadd or an ll/sc loop on ARM64). The parallel regions hand out their tasks with it."""
    sig = types.int64(arr, i, v)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], a, [args[1]])
        return builder.atomic_rmw("add", ptr, builder.sext(args[2], ir.IntType(64))
                                  if args[2].type.width < 64 else args[2], "monotonic")
    return sig, codegen
