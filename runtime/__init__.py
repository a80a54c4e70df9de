"""infer: quantized LLM inference for CPUs.

    import infer
    with infer.LLM("model.gguf") as llm:
        print(llm.generate("Once upon a time", max_tokens=32).text)

Importing this package compiles nothing and prints nothing: the heavy modules load on first use.
"""
from __future__ import annotations

import importlib
import os
import sys

from .errors import (ContextError, ConvertError, GGUFError, InferError, MetadataError,  # noqa: F401
                     NumericError, StateError, TemplateError, TensorError, TokenizerError, UnsupportedError)

__version__ = "0.1.0"


def _jit_cache_dir() -> str:
    """Where Numba keeps the compiled kernels: one directory per state of the package's sources.
    Numba checks only the timestamp of the file that defines a cached function, so after an
    upgrade a cached caller (the fused decode step) would keep the old code of a kernel it calls
    from another file; keying the directory on every source file avoids that, and keeps the cache
    out of site-packages (which may be read-only)."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [here, os.path.join(os.path.dirname(here), "quant")]
    try:
        import importlib.util
        spec = importlib.util.find_spec("infer.quant")
        if spec and spec.submodule_search_locations:
            roots = [here, *spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    h = hashlib.sha256(__version__.encode())
    for root in roots:
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for f in sorted(files):
                if f.endswith(".py"):
                    st = os.stat(os.path.join(dirpath, f))
                    h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "infer", "numba-" + h.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    try:
        os.environ["NUMBA_CACHE_DIR"] = _jit_cache_dir()
        if "numba" in sys.modules:          # numba imported first: its config is already read
            sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    except OSError:                          # no home directory: numba's own default applies
        pass

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
    "BatchEngine": ("infer.batch", "BatchEngine"),
    "SpeculativeConfig": ("infer.speculative", "SpeculativeConfig"),
}
__all__ = ["LLM", "Completion", "Chunk", "Stats", "SamplingParams", "Tokenizer", "StreamingDetokenizer",
           "ModelConfig", "convert", "perplexity", "calibrate", "ImportanceMatrix", "BatchEngine", "InferError",
           "SpeculativeConfig", "__version__"]


def __getattr__(name):
    if name == "convert":
        return importlib.import_module("infer.convert")   # a callable package: infer.convert(src, dst, ...)
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
