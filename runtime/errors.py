"""The one exception hierarchy users catch: every error `infer` raises on bad input is an InferError.

Each message is one line that names the file (or input) and what is wrong with it.
"""
from __future__ import annotations


class InferError(Exception):
    """Base class of every error `infer` raises for bad input or misuse."""


class GGUFError(InferError):
    """The file is not a valid GGUF file (bad magic, truncated, inconsistent sizes)."""


class MetadataError(GGUFError):
    """A required metadata key is missing or has the wrong type."""


class UnsupportedError(InferError):
    """Valid input that this version does not support (architecture, tensor type, ...)."""


class TensorError(GGUFError):
    """A tensor is missing, has the wrong shape, or lies outside the file."""


class TokenizerError(InferError):
    """The vocabulary cannot be loaded, or a token id is out of range."""


class ContextError(InferError):
    """The prompt (or the request) does not fit in the context window."""


class ConvertError(InferError):
    """A checkpoint cannot be converted (bad config, bad safetensors, pickle files, ...)."""


class TemplateError(InferError):
    """A chat template failed to parse or render, or tried something unsafe."""


class NumericError(InferError):
    """The model computed NaN or inf (weights holding NaN/inf, or activations that overflow)."""


class StateError(InferError):
    """A saved session cannot be loaded into this model."""
