"""Model families, found by `general.architecture` through ARCH_ALIASES (config.py)."""
from __future__ import annotations

from ..config import ARCH_ALIASES, ModelConfig


def load_model(gf, cfg: ModelConfig):
    family = ARCH_ALIASES[cfg.arch]
    if family == "llama":
        from .llama import LlamaModel
        return LlamaModel(gf, cfg)
    raise AssertionError(family)  # ARCH_ALIASES and this table are kept in step
