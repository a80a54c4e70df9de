"""Q2_K: 256 values, 84 bytes: scales[16] (per 16 values: scale in the low nibble, min in the
high one), qs[64], f16 d, f16 dmin. Group 4h + i: (qs[32h:][:32] >> 2i) & 3 (qs at byte 16),
sub-blocks 8h + 2i, 8h + 2i + 1 for its halves; w = d * (sc & 15) * q - dmin * (sc >> 4)."""
from ..types import Q2_K
from .base import BlockFormat, Group, KScales


def kscales(e):
    b = [e.bytes8(8 * h, range(8)) for h in range(2)]
    return KScales(e.cat16(*(e.and8(v, 15) for v in b)), e.f16(80), e.cat16(*(e.shr8(v, 4) for v in b)),
                   e.fneg(e.f16(82)))


def unpack(e):
    d, ndmin = e.f16(80), e.fneg(e.f16(82))
    out = []
    for h in range(2):
        b = e.bytes8(8 * h, range(8))                                    # sub-blocks 8h .. 8h + 7
        sv, mv = e.tof8(e.and8(b, 15), d), e.tof8(e.shr8(b, 4), ndmin)
        qs = e.load(16 + 32 * h, 32)
        for i in range(4):
            out.append(Group(e.vand(e.vshr(qs, 2 * i), 3), [e.lane(sv, 2 * i), e.lane(sv, 2 * i + 1)],
                             [e.lane(mv, 2 * i), e.lane(mv, 2 * i + 1)]))
    return out


FORMAT = BlockFormat(Q2_K, unpack, f16_at=(80, 82), has_min=True, centre=2, halves=2, kscales=kscales)
