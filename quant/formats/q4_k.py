"""Q4_K: 256 values, 144 bytes: f16 d, f16 dmin, scales[12] (a 6-bit scale and min per group,
packed as ggml's get_scale_min_k4), qs[128]: group j's 32 values are the low (j even) or high
(j odd) nibbles of qs[32 (j // 2):][:32]; w = d * sc_j * q - dmin * m_j."""
from ..types import Q4_K
from .base import BlockFormat, Group, KScales

LO4, HI4 = [0] * 4, [1] * 4


def scale_min_ints(e, at):
    """The 8 groups' 6-bit scales sc_j and mins m_j as two <8 x i32>, from the 12 bytes b at `at`:
    for j < 4 sc = b[j] & 63, m = b[j + 4] & 63; for j >= 4 sc = (b[j + 4] & 15) | (b[j - 4] >> 6)
    << 4 and m = (b[j + 4] >> 4) | (b[j] >> 6) << 4 (ggml's get_scale_min_k4). Computed on the
    bytes as three u32 with scalar ops, four bytes at a time (the integer ALUs; the same on <8 x i32>
    vectors was a quarter of the int8 decode kernel's time), as llama.cpp does."""
    u0, u1, u2 = e.u32(at), e.u32(at + 4), e.u32(at + 8)
    sc_hi = e.or_(e.and_(u2, 0x0F0F0F0F), e.and_(e.shr(u0, 2), 0x30303030))
    m_hi = e.or_(e.and_(e.shr(u2, 4), 0x0F0F0F0F), e.and_(e.shr(u1, 2), 0x30303030))
    return e.words8(e.and_(u0, 0x3F3F3F3F), sc_hi), e.words8(e.and_(u1, 0x3F3F3F3F), m_hi)


def scales_mins_k4(e, at, d, dmin):
    """The 8 groups' scales d * sc_j and mins -dmin * m_j as two <8 x float>."""
    sc, m = scale_min_ints(e, at)
    return e.tof8(sc, d), e.tof8(m, e.fneg(dmin))


def kscales(e):
    sc, m = scale_min_ints(e, 4)
    return KScales(e.pairs16(sc), e.f16(0), e.pairs16(m), e.fneg(e.f16(2)))


def unpack(e):
    s, m = scales_mins_k4(e, 4, e.f16(0), e.f16(2))
    out = []
    for j in range(8):
        q = e.vand(e.vshr(e.load(16 + 32 * (j // 2), 32), 4 * (j % 2)), 15)
        out.append(Group(q, [e.lane(s, j)], [e.lane(m, j)]))
    return out


FORMAT = BlockFormat(Q4_K, unpack, f16_at=(0, 2), has_min=True, centre=8, kscales=kscales)
