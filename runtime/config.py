"""ModelConfig: the hyper-parameters of a model, read from GGUF metadata and checked."""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, fields

from .errors import MetadataError, UnsupportedError
from .gguf_file import StringArray
from .rope import read_scaling

INT32_MAX = 2**31 - 1    # llama.cpp keeps the hyper-parameters in (u)int32
log = logging.getLogger("infer")
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
    embd_scale: bool = False  # token embeddings times sqrt(dim)
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs before the residual add
    act: str = "silu"         # the gated FFN's activation: "silu" or "gelu" (tanh form)
    swa: bool = False         # sliding-window layers: attention.sliding_window, a pattern (default 6)
    swa_pattern: int = 6      #   every swa_pattern-th layer global (llama.cpp's set_swa_pattern)
    fused_gate_up: bool = False  # ffn_up holds gate and up (2 * n_ff rows, gate first), no ffn_gate
    nope_step: int = 0        # every nope_step-th layer has no RoPE (llama.cpp's n_no_rope_layer_step)


# the architectures we run (general.architecture), as llama.cpp names them
ARCHS = {"llama": ArchTraits(), "mistral": ArchTraits(),
         "qwen2": ArchTraits(rope_neox=True, attn_bias=True),
         "qwen3": ArchTraits(rope_neox=True, qk_norm=True),
         "gemma3": ArchTraits(rope_neox=True, qk_norm=True, embd_scale=True, post_norms=True, act="gelu", swa=True),
         # fused attn_qkv / ffn_up (gate|up), LongRoPE factor tensors (models/llama.py); its
         # attention.sliding_window is read and not applied, as llama.cpp's phi3 loader does
         "phi3": ArchTraits(rope_neox=True, fused_gate_up=True),
         # llama with every 4th layer unrotated (NoPE): llama.cpp hard-codes the step, its
         # converter writes no per-layer key (convert/arch.py refuses other patterns)
         "smollm3": ArchTraits(nope_step=4)}
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
    embd_scale: bool = False
    post_norms: bool = False
    act: str = "silu"
    n_swa: int = 0           # sliding window (tokens) of the SWA layers; 0: none
    swa_layers: tuple = ()   # per layer: True where the layer attends within the window
    rope_base_swa: float = 10000.0   # the SWA layers' RoPE base (llama.cpp's rope_freq_base_train_swa)
    fused_gate_up: bool = False
    nope_layers: tuple = ()  # per layer: True where the layer applies no RoPE (smollm3)
    attn_scale_dim: int = 0  # the attention scale is 1/sqrt(this) (0: head_dim)
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

        for k in ("final_logit_softcapping", "attn_logit_softcapping"):       # Gemma 2's; not run here
            if md.get(f"{arch}.{k}"):
                raise UnsupportedError(f"{source}: metadata {arch}.{k} is set: logit soft-capping is not "
                                       f"supported yet (running without it would be wrong)")

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
            embd_scale=ARCHS[arch].embd_scale,
            post_norms=ARCHS[arch].post_norms,
            act=ARCHS[arch].act,
            **_swa(md, arch, source, ARCHS[arch], key),
            fused_gate_up=ARCHS[arch].fused_gate_up,
            nope_layers=_nope(ARCHS[arch], key("block_count", int)),
            name=md.get("general.name", "") if isinstance(md.get("general.name", ""), str) else "",
            **read_scaling(md, arch, source, _get),
        )
        for f in fields(cls):
            v = getattr(cfg, f.name)
            if f.type in ("int",) and not 0 < v <= INT32_MAX and f.name not in ("rope_orig_ctx", "n_swa",
                                                                                  "attn_scale_dim"):
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


def _nope(traits, n_layers) -> tuple:
    """llama.cpp's NoPE rule (smollm3): layer il rotates unless (il + 1) % n_no_rope_layer_step == 0."""
    if not traits.nope_step or not 0 < n_layers <= MAX_LAYERS:
        return ()
    return tuple((il + 1) % traits.nope_step == 0 for il in range(n_layers))


def _swa(md, arch, source, traits, key) -> dict:
    """Sliding-window attention as llama.cpp's gemma3 loader reads it: attention.sliding_window
    (none or 0: no SWA), attention.sliding_window_pattern (an int n: layer il slides unless
    il % n == n - 1; or a bool per layer), rope.freq_base_swa (default 10000)."""
    n_layers = key("block_count", int)
    out = {"rope_base_swa": float(key("rope.freq_base_swa", float, 10000.0))}
    if arch == "gemma3" and n_layers == 62:     # Gemma 3 27B: 1/sqrt(dim / heads), llama.cpp's rule
        out["attn_scale_dim"] = key("embedding_length", int) // key("attention.head_count", int)
    n_swa = key("attention.sliding_window", int, 0) if traits.swa else 0
    if arch == "phi3" and md.get("phi3.attention.sliding_window"):
        log.warning("%s: phi3 sliding window (%s tokens) not applied, as llama.cpp's loader disables it "
                    "(results past the window may differ from transformers')", source,
                    md["phi3.attention.sliding_window"])
    if not n_swa or not 0 < n_layers <= MAX_LAYERS:        # (a bad block_count is refused later)
        return out
    if n_swa < 0:
        raise MetadataError(f"{source}: metadata {arch}.attention.sliding_window must be positive, got {n_swa}")
    pat = md.get(f"{arch}.attention.sliding_window_pattern", traits.swa_pattern)
    if isinstance(pat, (list, tuple)):
        if len(pat) != n_layers or not all(isinstance(b, (bool, int)) for b in pat):
            raise MetadataError(f"{source}: metadata {arch}.attention.sliding_window_pattern must hold "
                                f"{n_layers} booleans")
        layers = tuple(bool(b) for b in pat)
    elif isinstance(pat, numbers.Integral) and not isinstance(pat, bool) and pat >= 0:
        layers = tuple(pat == 0 or il % pat < pat - 1 for il in range(n_layers))
    else:
        raise MetadataError(f"{source}: metadata {arch}.attention.sliding_window_pattern must be a "
                            f"non-negative integer or an array of booleans, got {pat!r}")
    if not (math.isfinite(out["rope_base_swa"]) and out["rope_base_swa"] > 0):
        raise MetadataError(f"{source}: metadata {arch}.rope.freq_base_swa must be a positive number")
    return {**out, "n_swa": int(n_swa), "swa_layers": layers}


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
