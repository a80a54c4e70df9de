"""ModelConfig: the hyper-parameters of a model, read from GGUF metadata and checked."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from .errors import MetadataError, UnsupportedError
from .gguf_file import StringArray
from .rope import read_scaling

INT32_MAX = 2**31 - 1    # llama.cpp keeps the hyper-parameters in (u)int32
MAX_LAYERS = 512         # llama.cpp's LLAMA_MAX_LAYERS: a block_count past it is a corrupt file

# ModelConfig fields -> the metadata keys they come from (after "<arch>.")
_KEYS = {"n_vocab": "vocab_size", "n_ctx_train": "context_length", "dim": "embedding_length",
         "n_layers": "block_count", "n_ff": "feed_forward_length", "n_heads": "attention.head_count",
         "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
         "rope_dim": "rope.dimension_count"}

@dataclass(frozen=True)
class ArchTraits:
    """How an architecture run by the llama family implementation (models/llama.py) differs."""
    family: str = "llama"
    rope_neox: bool = False  # RoPE on split halves (ggml's NEOX mode), not adjacent pairs
    attn_bias: bool = False  # q/k/v biases
    qk_norm: bool = False    # RMSNorm of each q and k head before RoPE (attn_q_norm / attn_k_norm)


# the architectures we run (general.architecture), as llama.cpp names them
ARCHS = {"llama": ArchTraits(), "mistral": ArchTraits(),
         "qwen2": ArchTraits(rope_neox=True, attn_bias=True),
         "qwen3": ArchTraits(rope_neox=True, qk_norm=True)}
ARCH_ALIASES = {a: t.family for a, t in ARCHS.items()}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_ctx_train: int
    dim: int
    n_layers: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_neox: bool          # qwen2 rotates split halves; llama adjacent pairs (q/k permuted by the converter)
    norm_eps: float
    attn_bias: bool          # q/k/v biases (qwen2)
    name: str = ""
    qk_norm: bool = False    # per-head RMSNorm of q and k (qwen3)
    # RoPE context scaling (rope.py): "none" | "linear" | "yarn", and its parameters
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_attn_factor: float = 1.0
    rope_orig_ctx: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_log_mul: float = 0.0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_metadata(cls, md: dict, source: str = "<metadata>") -> "ModelConfig":
        arch = _get(md, "general.architecture", str, source)
        if arch not in ARCH_ALIASES:
            raise UnsupportedError(f"{source}: unknown architecture {arch!r} "
                                   f"(supported: {', '.join(sorted(ARCH_ALIASES))})")

        def key(name, typ, default=None):
            return _get(md, f"{arch}.{name}", typ, source, default)

        dim = key("embedding_length", int)
        n_heads = key("attention.head_count", int)
        n_kv = key("attention.head_count_kv", int, n_heads)
        if n_heads <= 0 or dim <= 0 or n_kv <= 0 or n_heads % n_kv:
            raise MetadataError(f"{source}: inconsistent attention heads ({n_heads} heads, {n_kv} kv heads, dim {dim})")
        head_dim = key("attention.key_length", int, dim // n_heads)
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = key("vocab_size", int, len(tokens) if isinstance(tokens, (list, StringArray)) else None)
        cfg = cls(
            arch=arch,
            n_vocab=n_vocab,
            n_ctx_train=key("context_length", int),
            dim=dim,
            n_layers=key("block_count", int),
            n_ff=key("feed_forward_length", int),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rope_dim=key("rope.dimension_count", int, head_dim),
            rope_base=float(key("rope.freq_base", float, 10000.0)),
            rope_neox=ARCHS[arch].rope_neox,
            norm_eps=float(key("attention.layer_norm_rms_epsilon", float)),
            attn_bias=ARCHS[arch].attn_bias,
            qk_norm=ARCHS[arch].qk_norm,
            name=md.get("general.name", "") if isinstance(md.get("general.name", ""), str) else "",
            **read_scaling(md, arch, source, _get),
        )
        for f in fields(cls):
            v = getattr(cfg, f.name)
            if f.type in ("int",) and not 0 < v <= INT32_MAX and f.name != "rope_orig_ctx":
                raise MetadataError(f"{source}: metadata {arch}.{_KEYS.get(f.name, f.name)} must be positive "
                                    f"and fit int32, got {v}")
        if cfg.n_layers > MAX_LAYERS:
            raise MetadataError(f"{source}: metadata {arch}.block_count is {cfg.n_layers} "
                                f"(at most {MAX_LAYERS}, llama.cpp's LLAMA_MAX_LAYERS)")
        if not (math.isfinite(cfg.rope_base) and cfg.rope_base > 0):
            raise MetadataError(f"{source}: metadata {arch}.rope.freq_base must be a positive number, got {cfg.rope_base}")
        if not (math.isfinite(cfg.norm_eps) and cfg.norm_eps >= 0):
            raise MetadataError(f"{source}: metadata {arch}.attention.layer_norm_rms_epsilon must be a "
                                f"non-negative number, got {cfg.norm_eps}")
        if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
            raise MetadataError(f"{source}: rope dimension {cfg.rope_dim} does not fit head size {cfg.head_dim}")
        return cfg


def _get(md, key, typ, source, default=None):
    if key not in md:
        if default is not None:
            return default
        raise MetadataError(f"{source}: missing metadata key {key!r}")
    v = md[key]
    if typ is int:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    elif typ is float:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    else:
        ok = isinstance(v, typ)
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string"}[typ]
        raise MetadataError(f"{source}: metadata key {key!r} has type {type(v).__name__}, expected {want}")
    return v
