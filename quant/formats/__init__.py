"""The block formats the kernels run natively: one module each, registered here once.

A module defines `FORMAT = BlockFormat(...)`: its GGUF type (quant/types.py: id, elements and
bytes per block), how its values are written (`signed`, `offset`, `centre`, `has_min`, `halves`)
and `unpack(e)`, the kernel piece that turns one block into groups of 32 columns (see base.py).
Every kernel (decode matvec on float or int8 activations, prefill matmul, dequantization) is
generated from these definitions by runtime/kernels/blockir.py, and the tests check each against
its reference dequantizer. Adding a format: one module here and its name in _MODULES.
"""
from __future__ import annotations

import importlib

from .base import BlockFormat, Group  # noqa: F401

_MODULES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
            "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")

FORMATS: dict[int, BlockFormat] = {}
for _m in _MODULES:
    _f = importlib.import_module(f"{__name__}.{_m}").FORMAT
    FORMATS[_f.id] = _f


def format_of(type_id: int) -> BlockFormat | None:
    """The block format of a GGUF type id, or None (F32/F16/BF16 and types without kernels)."""
    return FORMATS.get(int(type_id))
