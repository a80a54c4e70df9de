"""Q4_0: 32 values, 18 bytes: f16 d, qs[16] (byte i: column i in the low nibble, i + 16 in the
high one); w = d * (q - 8)."""
from ..types import Q4_0
from .base import BlockFormat, Group


def unpack(e):
    return [Group(e.nibbles16(2), [e.f16(0)])]


FORMAT = BlockFormat(Q4_0, unpack, f16_at=(0,), offset=8)
