"""GGML tensor types: ids as in ggml.h, block sizes and bytes per block.

F32, F16 and BF16 (the upper 16 bits of a float32) are plain arrays; the block formats the kernels run (layouts, codecs, kernel pieces) are quant/formats, one module
each; this table is ggml's list of ids and sizes, for reading any file.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    name: str
    id: int
    block_size: int   # elements per block
    type_size: int    # bytes per block

    @property
    def native(self) -> bool:
        """Whether the runtime runs it: F32/F16/BF16 and the block formats of quant/formats."""
        from .formats import FORMATS
        return self.id in FORMATS or self.name in ("F32", "F16", "BF16")

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


F32 = QType("F32", 0, 1, 4)
F16 = QType("F16", 1, 1, 2)
Q4_0 = QType("Q4_0", 2, 32, 18)
Q4_1 = QType("Q4_1", 3, 32, 20)
Q5_0 = QType("Q5_0", 6, 32, 22)
Q5_1 = QType("Q5_1", 7, 32, 24)
Q8_0 = QType("Q8_0", 8, 32, 34)
Q2_K = QType("Q2_K", 10, 256, 84)
Q3_K = QType("Q3_K", 11, 256, 110)
Q4_K = QType("Q4_K", 12, 256, 144)
Q5_K = QType("Q5_K", 13, 256, 176)
Q6_K = QType("Q6_K", 14, 256, 210)
IQ4_NL = QType("IQ4_NL", 20, 32, 18)
IQ4_XS = QType("IQ4_XS", 23, 256, 136)
# the rest of ggml's types, read (inspect lists them) but not run
_OTHER = [QType(n, i, b, s) for n, i, b, s in (
    ("Q8_1", 9, 32, 40), ("Q8_K", 15, 256, 292), ("IQ2_XXS", 16, 256, 66), ("IQ2_XS", 17, 256, 74),
    ("IQ3_XXS", 18, 256, 98), ("IQ1_S", 19, 256, 50), ("IQ3_S", 21, 256, 110), ("IQ2_S", 22, 256, 82),
    ("IQ1_M", 29, 256, 56), ("TQ1_0", 34, 256, 54), ("TQ2_0", 35, 256, 66), ("MXFP4", 39, 32, 17))]
BF16 = QType("BF16", 30, 1, 2)

QTYPES = {t.id: t for t in (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16, *_OTHER)}
_BY_NAME = {t.name.lower(): t for t in QTYPES.values()}


def qtype_by_id(type_id: int) -> QType | None:
    return QTYPES.get(int(type_id))


def qtype_by_name(name: str) -> QType | None:
    return _BY_NAME.get(name.lower())


def tensor_nbytes(qt: QType, n_elements: int) -> int:
    return n_elements // qt.block_size * qt.type_size
