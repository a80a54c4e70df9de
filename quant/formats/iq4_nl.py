"""IQ4_NL: 32 values, 18 bytes: f16 d, qs[16] (nibbles as Q4_0, indices into a table of 16 int8
levels); w = d * KVALUES[nibble]."""
from ..types import IQ4_NL
from .base import BlockFormat, Group

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def unpack(e):
    return [Group(e.lookup16(e.nibbles16(2), KVALUES), [e.f16(0)])]


FORMAT = BlockFormat(IQ4_NL, unpack, f16_at=(0,), signed=True)
