"""Q4_1: 32 values, 20 bytes: f16 d, f16 m, qs[16] (nibbles as Q4_0); w = d * q + m."""
from ..types import Q4_1
from .base import BlockFormat, Group


def unpack(e):
    return [Group(e.nibbles16(4), [e.f16(0)], [e.f16(2)])]


FORMAT = BlockFormat(Q4_1, unpack, f16_at=(0, 2), has_min=True, centre=8)
