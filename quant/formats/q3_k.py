"""Q3_K: 256 values, 110 bytes: hmask[32], qs[64], scales[12] (16 6-bit scales, offset 32), f16 d.
Group 4h + i (h: half of 128 values): 2-bit values (qs[32h:32h + 32] >> 2i) & 3, plus 4 where
bit 4h + i of hmask[0..31] is set; scales 8h + 2i, 8h + 2i + 1 for its halves;
w = d * (sc - 32) * (q - 4). Scale i (0..15) of the 12 bytes b at 96: low 4 bits from b[i % 8]
(nibble i // 8), high 2 bits from b[8 + i % 4] (bits 2 (i // 4))."""
from ..types import Q3_K
from .base import BlockFormat, Group, KScales


def scale_ints(e, h):
    """Scales 8h .. 8h + 7 (minus 32) as an <8 x i32>."""
    lo = e.and8(e.shr8(e.bytes8(96, range(8)), 4 * h), 15)
    hi = e.and8(e.shr8(e.bytes8(96, [8, 9, 10, 11, 8, 9, 10, 11]), [4 * h] * 4 + [4 * h + 2] * 4), 3)
    return e.sub8(e.or8(lo, e.shl8(hi, 4)), 32)


def kscales(e):
    return KScales(e.cat16(scale_ints(e, 0), scale_ints(e, 1)), e.f16(108))


def unpack(e):
    d = e.f16(108)
    hm = e.load(0, 32)
    out = []
    for h in range(2):
        sv = e.tof8(scale_ints(e, h), d)                                 # scales 8h .. 8h + 7
        qs = e.load(32 + 32 * h, 32)
        for i in range(4):
            q = e.vor(e.vand(e.vshr(qs, 2 * i), 3), e.bitplane(hm, list(range(32)), [1 << (4 * h + i)] * 32, 4))
            out.append(Group(q, [e.lane(sv, 2 * i), e.lane(sv, 2 * i + 1)]))
    return out


FORMAT = BlockFormat(Q3_K, unpack, f16_at=(108,), offset=4, halves=2, kscales=kscales)
