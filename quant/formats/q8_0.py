"""Q8_0: 32 values, 34 bytes: f16 d, int8 q[32]; w = d * q."""
from ..types import Q8_0
from .base import BlockFormat, Group


def unpack(e):
    return [Group(e.load(2, 32), [e.f16(0)])]


FORMAT = BlockFormat(Q8_0, unpack, f16_at=(0,), signed=True)
