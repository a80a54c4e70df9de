"""GGML tensor types: ids as in ggml.h, block sizes and bytes per block.

Block layouts (little endian, blocks of `block_size` elements along a row):
  F32   float32
  F16   float16
  BF16  bfloat16 (upper 16 bits of a float32)
  Q8_0  32 elems: f16 d, int8 q[32]                     x = d * q
  Q4_0  32 elems: f16 d, uint8 qs[16]                   x = d * (nib - 8)
  Q4_1  32 elems: f16 d, f16 m, uint8 qs[16]            x = d * nib + m
  (nibbles: qs[j] & 0xF is element j, qs[j] >> 4 is element j + 16)
Types the runtime only reads (dequantized when the model loads): Q5_0, Q5_1, the K-quants.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    name: str
    id: int
    block_size: int   # elements per block
    type_size: int    # bytes per block
    native: bool      # has Numba matvec/matmul kernels over the raw blocks

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


F32 = QType("F32", 0, 1, 4, True)
F16 = QType("F16", 1, 1, 2, True)
Q4_0 = QType("Q4_0", 2, 32, 18, True)
Q4_1 = QType("Q4_1", 3, 32, 20, True)
Q5_0 = QType("Q5_0", 6, 32, 22, False)
Q5_1 = QType("Q5_1", 7, 32, 24, False)
Q8_0 = QType("Q8_0", 8, 32, 34, True)
Q2_K = QType("Q2_K", 10, 256, 84, False)
Q3_K = QType("Q3_K", 11, 256, 110, False)
Q4_K = QType("Q4_K", 12, 256, 144, False)
Q5_K = QType("Q5_K", 13, 256, 176, False)
Q6_K = QType("Q6_K", 14, 256, 210, False)
IQ4_NL = QType("IQ4_NL", 20, 32, 18, False)
IQ4_XS = QType("IQ4_XS", 23, 256, 136, False)
BF16 = QType("BF16", 30, 1, 2, True)

QTYPES = {t.id: t for t in (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16)}
_BY_NAME = {t.name.lower(): t for t in QTYPES.values()}


def qtype_by_id(type_id: int) -> QType | None:
    return QTYPES.get(int(type_id))


def qtype_by_name(name: str) -> QType | None:
    return _BY_NAME.get(name.lower())


def tensor_nbytes(qt: QType, n_elements: int) -> int:
    return n_elements // qt.block_size * qt.type_size
