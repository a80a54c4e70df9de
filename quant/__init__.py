"""Block formats of the GGUF quant types `infer` supports, their codecs and recipes.

The layouts are defined here once; kernels and the converter take their constants from here.
  types.py     QType: ids, block sizes, bytes per block
  codecs.py    numpy reference quantize/dequantize per type (== gguf.quants bit for bit)
  quantize.py  Numba quantizers (== codecs bit for bit); imported lazily (loads numba)
  recipes.py   (recipe, tensor name, shape) -> QType
"""
from .types import QType, QTYPES, qtype_by_id, qtype_by_name, tensor_nbytes  # noqa: F401
