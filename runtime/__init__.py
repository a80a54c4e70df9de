"""infer: quantized LLM inference for CPUs. Importing this package compiles nothing and prints nothing."""
from .errors import InferError  # noqa: F401

__version__ = "0.1.0"
