"""Q4_K: 256 values, 144 bytes: f16 d, f16 dmin, scales[12] (a 6-bit scale and min per group,
packed as ggml's get_scale_min_k4), qs[128]: group j's 32 values are the low (j even) or high
(j odd) nibbles of qs[32 (j // 2):][:32]; w = d * sc_j * q - dmin * m_j."""
from ..types import Q4_K
from .base import BlockFormat, Group, KScales

LO4, HI4 = [0] * 4, [1] * 4


def scale_min_ints(e, at):
    """The 8 groups' 6-bit scales sc_j and mins m_j as two <8 x i32>, from the 12 bytes b at `at`:
    for j < 4 sc = b[j] & 63, m = b[j + 4] & 63; for j >= 4 sc = (b[j + 4] & 15) | (b[j - 4] >> 6)
    << 4 and m = (b[j + 4] >> 4) | (b[j] >> 6) << 4 (ggml's get_scale_min_k4)."""
    top = e.shl8(e.and8(e.shr8(e.bytes8(at, [0, 1, 2, 3, 0, 1, 2, 3]), 6), [0] * 4 + [3] * 4), 4)
    sc = e.or8(e.and8(e.bytes8(at, [0, 1, 2, 3, 8, 9, 10, 11]), [63] * 4 + [15] * 4), top)
    mt = e.shl8(e.and8(e.shr8(e.bytes8(at, [0, 1, 2, 3, 4, 5, 6, 7]), 6), [0] * 4 + [3] * 4), 4)
    m = e.or8(e.and8(e.shr8(e.bytes8(at, [4, 5, 6, 7, 8, 9, 10, 11]), [0] * 4 + [4] * 4), [63] * 4 + [15] * 4), mt)
    return sc, m


def scales_mins_k4(e, at, d, dmin):
    """The 8 groups' scales d * sc_j and mins -dmin * m_j as two <8 x float>."""
    sc, m = scale_min_ints(e, at)
    return e.tof8(sc, d), e.tof8(m, e.fneg(dmin))


def kscales(e):
    """The same fields with scalar ops on the 12 bytes as three u32 (the integer ALUs; the
    vector form above cost a quarter of the int8 decode kernel's time), as llama.cpp does."""
    u0, u1, u2 = e.u32(4), e.u32(8), e.u32(12)
    sc_lo, m_lo = e.and_(u0, 0x3F3F3F3F), e.and_(u1, 0x3F3F3F3F)
    sc_hi = e.or_(e.and_(u2, 0x0F0F0F0F), e.and_(e.shr(u0, 2), 0x30303030))
    m_hi = e.or_(e.and_(e.shr(u2, 4), 0x0F0F0F0F), e.and_(e.shr(u1, 2), 0x30303030))
    return KScales(e.pairs16_bytes(sc_lo, sc_hi), e.f16(0), e.pairs16_bytes(m_lo, m_hi), e.fneg(e.f16(2)))


def unpack(e):
    s, m = scales_mins_k4(e, 4, e.f16(0), e.f16(2))
    out = []
    for j in range(8):
        q = e.vand(e.vshr(e.load(16 + 32 * (j // 2), 32), 4 * (j % 2)), 15)
        out.append(Group(q, [e.lane(s, j)], [e.lane(m, j)]))
    return out


FORMAT = BlockFormat(Q4_K, unpack, f16_at=(0, 2), has_min=True, centre=8, kscales=kscales)
