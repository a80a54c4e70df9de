"""What a block format states about itself (see __init__.py).

A block of `qtype.block_size` values (32 or 256) is `groups` groups of 32 columns. Group j's
value in column c (0..31) is

    w = s * (q - offset) + m          s, m: per group, or per half (columns 0-15, 16-31)

with q an integer the kernels take as one byte (`signed`: -128..127, else 0..255). `unpack(e)`
returns the block's groups as `Group(q, s, m)`: q a <32 x i8> vector of the 32 q values in column
order, s a list of 1 or `halves` = 2 float scales, m the same for the mins (None unless
`has_min`); it builds them with the operations of `e` (blockir.Emit: loads at byte offsets within
the block, f16 scales, nibbles, bit planes, table lookups), so a format module holds no LLVM.
`centre`: for formats with mins, the value the int8 kernels subtract from q before the dot
product (adding centre * s to the min), so that the int8 rounding of the activations multiplies
q - centre instead of q (Q4_1's 8 as llama.cpp's kernels do; 0 turns it off).
`dequantize(raw)`: the format's own numpy codec, (n, type_size) uint8 -> (n, block_size) float32:
the same `unpack` run by NumpyEmit (numpy arrays over n blocks in place of IR values); the tests
check it, and every kernel, against gguf.quants (a port of ggml's reference C code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from ..types import QType


class Lane(NamedTuple):
    """Element i of an <8 x float> IR vector (blockir.Emit.lane): a group's scale or min taken
    from a vector holding the block's eight (or sixteen, in two vectors)."""
    vec: Any
    i: int


class KScales(NamedTuple):
    """A 256-value block's scales as integers, for the int8 kernels (decode: llama.cpp's Q8_K dot
    products, one activation scale per 256 values; prompts: a step per 16 values, the token's
    multipliers times sc; the block's integer sums folded into vpmaddwd): w = d * sc_h * (q -
    offset) + dm * m_h for the block's 16 halves h of 16 values.
    sc, m: <16 x i16> IR vectors (m None without mins); d, dm: float."""
    sc: Any
    d: Any
    m: Any = None
    dm: Any = None


class Group(NamedTuple):
    q: Any                 # <32 x i8> IR value
    s: list                # 1 or 2 float IR values
    m: list | None = None  # mins, as s


@dataclass(frozen=True)
class BlockFormat:
    qtype: QType
    unpack: Callable       # unpack(e) -> list[Group] of length groups
    f16_at: tuple = (0,)   # byte offsets of the block's f16 fields (scales, mins)
    kscales: Callable | None = None   # kscales(e) -> KScales (256-value formats: see KScales)
    signed: bool = False
    offset: int = 0        # a power of two or 0
    has_min: bool = False
    centre: int = 0        # a power of two or 0; formats with mins only
    halves: int = 1        # scales (and mins) per group: 1, or 2 for groups of 16 values

    @property
    def id(self) -> int:
        return self.qtype.id

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block(self) -> int:
        return self.qtype.block_size

    @property
    def size(self) -> int:
        return self.qtype.type_size

    @property
    def groups(self) -> int:
        return self.qtype.block_size // 32

    def unpack_np(self, raw: np.ndarray) -> list:
        """The groups of blocks raw (n, type_size) uint8 as numpy: Group(q (n, 32) int64, s, m)
        with s, m lists of (n,) float32."""
        groups = self.unpack(NumpyEmit(np.ascontiguousarray(raw, np.uint8).reshape(-1, self.size)))
        return [Group(g.q.view(np.int8).astype(np.int64) if self.signed else g.q.astype(np.int64), g.s, g.m)
                for g in groups]

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Blocks raw (n, type_size) uint8 -> (n, block_size) float32."""
        raw = np.ascontiguousarray(raw, np.uint8).reshape(-1, self.size)
        out = np.empty((raw.shape[0], self.groups, 32), np.float32)
        off = np.float32(self.offset)
        for j, g in enumerate(self.unpack_np(raw)):
            q = g.q.astype(np.float32)
            for h in range(2):
                sl = slice(16 * h, 16 * h + 16)
                k = h if len(g.s) == 2 else 0
                v = g.s[k][:, None] * (q[:, sl] - off) if self.offset else g.s[k][:, None] * q[:, sl]
                out[:, j, sl] = v + g.m[k][:, None] if g.m is not None else v
        return out.reshape(-1, self.block)


class NumpyEmit:
    """Emit's operations on numpy arrays over n blocks (blockir.Emit builds the same as IR):
    scalars are (n,) int64 or float32 arrays, vectors (n, 32) uint8."""

    def __init__(self, raw):
        self.raw = raw

    def load(self, k, n):
        return self.raw[:, k:k + n]

    def f16(self, k):
        return np.ascontiguousarray(self.raw[:, k:k + 2]).view(np.float16)[:, 0].astype(np.float32)

    def u8(self, k):
        return self.raw[:, k].astype(np.int64)

    def i8(self, k):
        return self.raw[:, k].view(np.int8).astype(np.int64)

    def u16(self, k):
        return np.ascontiguousarray(self.raw[:, k:k + 2]).view(np.uint16)[:, 0].astype(np.int64)

    def u32(self, k):
        return np.ascontiguousarray(self.raw[:, k:k + 4]).view(np.uint32)[:, 0].astype(np.int64)

    def words8(self, lo, hi):
        return np.stack([(v >> (8 * i)) & 255 for v in (lo, hi) for i in range(4)], 1)

    def and_(self, a, b):
        return a & b

    def or_(self, a, b):
        return a | b

    def shr(self, a, n):
        return a >> n

    def shl(self, a, n):
        return a << n

    def sub(self, a, b):
        return a - b

    def itof(self, a):
        return a.astype(np.float32)

    def fmul(self, a, b):
        return (a * b).astype(np.float32)

    def fneg(self, a):
        return -a

    def vand(self, v, m):
        return v & np.uint8(m)

    def vor(self, a, b):
        return a | b

    def vshr(self, v, n):
        return v >> np.uint8(n)

    def vshl(self, v, n):
        return (v << np.uint8(n)).astype(np.uint8)

    def nibbles16(self, k):
        q = self.raw[:, k:k + 16]
        return np.concatenate([q & np.uint8(15), q >> np.uint8(4)], axis=1)

    def bitplane(self, src, idx, mask, val):
        hit = (src[:, list(idx)] & np.array(mask, np.uint8)) != 0
        return np.where(hit, np.uint8(val), np.uint8(0))

    def lookup16(self, idx, table):
        return (np.array(table, np.int64) & 255).astype(np.uint8)[idx]

    def bytes8(self, k, idx, signed=False):
        v = self.raw[:, [k + i for i in idx]]
        return v.view(np.int8).astype(np.int64) if signed else v.astype(np.int64)

    def splat8(self, a):
        return np.repeat(a[:, None], 8, 1)

    def and8(self, a, c):
        return a & np.asarray(c)

    def or8(self, a, b):
        return a | np.asarray(b)

    def shr8(self, a, c):
        return a >> np.asarray(c)

    def shl8(self, a, c):
        return a << np.asarray(c)

    def sub8(self, a, c):
        return a - np.asarray(c)

    def tof8(self, a, scale):
        return (a.astype(np.float32) * scale[:, None]).astype(np.float32)

    def lane(self, vf, i):
        return vf[:, i]

    def pairs16(self, v):
        return np.repeat(v, 2, axis=1)

    def cat16(self, a, b):
        return np.concatenate([a, b], axis=1)

    def kscales_np(self, fmt):
        return fmt.kscales(self)
