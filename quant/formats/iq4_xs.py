"""IQ4_XS: 256 values, 136 bytes: f16 d, u16 scales_h, scales_l[4], qs[128]. Group j (32 values):
6-bit scale ls = ((scales_l[j // 2] >> 4 (j % 2)) & 15) | (((scales_h >> 2j) & 3) << 4), its 16
bytes qs[16j:16j+16] nibbles as IQ4_NL; w = d * (ls - 32) * KVALUES[nibble]."""
from ..types import IQ4_XS
from .base import BlockFormat, Group, KScales
from .iq4_nl import KVALUES


def scale_ints(e):
    lo = e.and8(e.shr8(e.bytes8(4, [0, 0, 1, 1, 2, 2, 3, 3]), [0, 4] * 4), 15)
    hi = e.and8(e.shr8(e.splat8(e.u16(2)), [2 * j for j in range(8)]), 3)
    return e.sub8(e.or8(lo, e.shl8(hi, 4)), 32)


def kscales(e):
    return KScales(e.pairs16(scale_ints(e)), e.f16(0))


def unpack(e):
    sv = e.tof8(scale_ints(e), e.f16(0))
    return [Group(e.lookup16(e.nibbles16(8 + 16 * j), KVALUES), [e.lane(sv, j)]) for j in range(8)]


FORMAT = BlockFormat(IQ4_XS, unpack, f16_at=(0,), signed=True, kscales=kscales)
