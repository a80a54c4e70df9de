"""Q6_K: 256 values, 210 bytes: ql[128], qh[64], int8 scales[16] (one per 16 values), f16 d.
Half h (128 values) = groups 4h..4h+3; group 4h + i takes the low (i < 2) or high nibbles of
ql[64h + 32 (i % 2):][:32] and bits 2i, 2i+1 of qh[32h:32h + 32] as bits 4-5; scales 8h + 2i and
8h + 2i + 1 for its two halves; w = d * sc * (q - 32)."""
from ..types import Q6_K
from .base import BlockFormat, Group, KScales


def kscales(e):
    return KScales(e.cat16(*(e.bytes8(192 + 8 * h, range(8), signed=True) for h in range(2))), e.f16(208))


def unpack(e):
    d = e.f16(208)
    out = []
    for h in range(2):
        sv = e.tof8(e.bytes8(192 + 8 * h, range(8), signed=True), d)     # scales 8h .. 8h + 7
        qh = e.load(128 + 32 * h, 32)
        for i in range(4):
            lo = e.vand(e.vshr(e.load(64 * h + 32 * (i % 2), 32), 4 * (i // 2)), 15)
            hi = e.vshl(e.vand(e.vshr(qh, 2 * i), 3), 4)
            out.append(Group(e.vor(lo, hi), [e.lane(sv, 2 * i), e.lane(sv, 2 * i + 1)]))
    return out


FORMAT = BlockFormat(Q6_K, unpack, f16_at=(208,), offset=32, halves=2, kscales=kscales)
