"""Block formats of the GGUF quant types `infer` supports, their codecs and recipes.

The layouts are defined here once; kernels and the converter take their constants from here.
"""
from .types import QType, QTYPES, qtype_by_id, qtype_by_name, tensor_nbytes  # noqa: F401
