"""infer: quantized LLM inference for CPUs.

    import infer
    with infer.LLM("model.gguf") as llm:
        print(llm.generate("Once upon a time", max_tokens=32).text)

Importing this package compiles nothing and prints nothing: the heavy modules load on first use.
"""
from __future__ import annotations

import importlib

from .errors import (ContextError, ConvertError, GGUFError, InferError, MetadataError,  # noqa: F401
                     StateError, TemplateError, TensorError, TokenizerError, UnsupportedError)

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("infer.api", "LLM"),
    "Completion": ("infer.api", "Completion"),
    "Chunk": ("infer.generate", "Chunk"),
    "Stats": ("infer.generate", "Stats"),
    "SamplingParams": ("infer.sampling", "SamplingParams"),
    "Tokenizer": ("infer.tokenizer", "Tokenizer"),
    "StreamingDetokenizer": ("infer.tokenizer", "StreamingDetokenizer"),
    "ModelConfig": ("infer.config", "ModelConfig"),
    "perplexity": ("infer.perplexity", "perplexity"),
    "calibrate": ("infer.calibrate", "calibrate"),
    "ImportanceMatrix": ("infer.quant.imatrix", "ImportanceMatrix"),
}
__all__ = ["LLM", "Completion", "Chunk", "Stats", "SamplingParams", "Tokenizer", "StreamingDetokenizer",
           "ModelConfig", "convert", "perplexity", "calibrate", "ImportanceMatrix", "InferError", "__version__"]


def __getattr__(name):
    if name == "convert":
        return importlib.import_module("infer.convert")   # a callable package: infer.convert(src, dst, ...)
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
