"""Q5_0: 32 values, 22 bytes: f16 d, qh (32 bits: bit c is column c's fifth bit), qs[16]
(nibbles as Q4_0); w = d * (q - 16)."""
from ..types import Q5_0
from .base import BlockFormat, Group


def unpack(e):
    hi = e.bitplane(e.load(2, 4), [c // 8 for c in range(32)], [1 << (c % 8) for c in range(32)], 16)
    return [Group(e.vor(e.nibbles16(6), hi), [e.f16(0)])]


FORMAT = BlockFormat(Q5_0, unpack, f16_at=(0,), offset=16)
