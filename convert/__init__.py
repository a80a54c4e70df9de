"""Hugging Face safetensors checkpoints -> GGUF files (llama.cpp-compatible), streaming and atomic.

    from infer.convert import convert
    summary = convert("SmolLM2-135M-Instruct/", "smollm2-q8_0.gguf", type="q8_0")

Modules: safetensors.py (validated reader, bf16 by hand), arch.py (config + tensor names per
architecture), vocab.py (SentencePiece / BPE tokenizer metadata), gguf_writer.py (streaming writer),
pipeline.py (plan, then write). Importing this package loads none of them.
"""
from __future__ import annotations


def convert(src, dst=None, type: str = "q8_0", *, force: bool = False, dry_run: bool = False, progress=None,
            imatrix=None):
    """Convert the Hugging Face folder `src` to GGUF file `dst`; see infer.convert.pipeline.convert.
    imatrix: an importance matrix (infer.calibrate(...) or its saved file) for calibrated q4_0/q4_1."""
    from .pipeline import convert as _convert
    return _convert(src, dst, type, force=force, dry_run=dry_run, progress=progress, imatrix=imatrix)


def recipes() -> dict[str, str]:
    """Names of the --type recipes and what they do."""
    from infer.quant.recipes import RECIPES
    return {name: r.description for name, r in RECIPES.items()}


# `infer.convert` is both this package and the library call `infer.convert(src, dst, type=...)`:
# the package object itself is callable, so importing a submodule (which rebinds the attribute
# `infer.convert` to the package) can never shadow the function.
import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    def __call__(self, src, dst=None, type: str = "q8_0", *, force: bool = False, dry_run: bool = False,
                 progress=None, imatrix=None):
        return convert(src, dst, type, force=force, dry_run=dry_run, progress=progress, imatrix=imatrix)


_sys.modules[__name__].__class__ = _CallablePackage
