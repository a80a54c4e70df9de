"""Q5_1: 32 values, 24 bytes: f16 d, f16 m, qh (32 bits), qs[16] (as Q5_0); w = d * q + m."""
from ..types import Q5_1
from .base import BlockFormat, Group


def unpack(e):
    hi = e.bitplane(e.load(4, 4), [c // 8 for c in range(32)], [1 << (c % 8) for c in range(32)], 16)
    return [Group(e.vor(e.nibbles16(8), hi), [e.f16(0)], [e.f16(2)])]


FORMAT = BlockFormat(Q5_1, unpack, f16_at=(0, 2), has_min=True, centre=16)
