"""RoPE frequencies as the file asks for them: the base frequencies, a model's per-dimension
factors (`rope_freqs.weight`: Llama 3.x), and context scaling (`<arch>.rope.scaling.*`: linear,
YaRN), read the way llama.cpp reads them (llama-model.cpp's hparams, llama-context.cpp's YaRN
attention factor, ggml's rope_yarn).

Every supported scaling keeps the rotation angle of dimension pair i linear in the position,
theta_i(p) = p * inv_freq[i], so it folds into `inv_freq` (the kernels and the ring cache's
context shift are unchanged); YaRN's magnitude factor m, which llama.cpp and transformers put on
cos and sin (so on q and k), folds into the attention scale as m^2. A scaling type not
implemented here is refused, never run unscaled. LongRoPE (phi3) is per-dimension factors in
tensors (`rope_factors_long.weight` / `rope_factors_short.weight`, one chosen by the context
size as llama.cpp's get_rope_factors does: models/llama.py) with the file's attention factor;
its scaling type, when a file names it, scales nothing else."""
from __future__ import annotations

import math

import numpy as np

from .errors import MetadataError, UnsupportedError

SCALING_TYPES = ("none", "linear", "yarn", "longrope")
LONGROPE_ARCHS = ("phi3",)      # the architectures whose loader reads the LongRoPE factor tensors


def read_scaling(md: dict, arch: str, source: str, get) -> dict:
    """The rope.scaling.* keys of `arch` as ModelConfig fields (get: config._get)."""
    def key(name, typ, default):
        return get(md, f"{arch}.rope.scaling.{name}", typ, source, default)
    kind = key("type", str, "linear")          # llama.cpp's default: linear, a factor of 1 unless given
    if kind not in SCALING_TYPES or kind == "longrope" and arch not in LONGROPE_ARCHS:
        ok = [t for t in SCALING_TYPES if t != "longrope" or arch in LONGROPE_ARCHS]
        raise UnsupportedError(f"{source}: rope scaling type {kind!r} is not supported for {arch} (supported: "
                               f"{', '.join(ok)}); running it unscaled would be wrong")
    factor = float(key("factor", float, 0.0) or get(md, f"{arch}.rope.scale_linear", float, source, 0.0) or 0.0)
    if not (math.isfinite(factor) and factor >= 0):
        raise MetadataError(f"{source}: metadata {arch}.rope.scaling.factor must be a non-negative number, got {factor}")
    if kind in ("none", "longrope") or factor in (0.0, 1.0) and kind == "linear":
        kind, factor = "none", 1.0
    out = {"rope_scaling": kind, "rope_factor": factor or 1.0,
           "rope_attn_factor": float(key("attn_factor", float, 1.0)),
           "rope_orig_ctx": int(key("original_context_length", int, 0)),
           "yarn_beta_fast": float(key("yarn_beta_fast", float, 32.0)),
           "yarn_beta_slow": float(key("yarn_beta_slow", float, 1.0)),
           "yarn_log_mul": float(key("yarn_log_multiplier", float, 0.0))}
    for k in ("rope_attn_factor", "yarn_beta_fast", "yarn_beta_slow"):
        if not (math.isfinite(out[k]) and out[k] > 0):
            raise MetadataError(f"{source}: rope scaling parameter {k} must be a positive number, got {out[k]}")
    if not 0 <= out["rope_orig_ctx"] <= 2**31 - 1:
        raise MetadataError(f"{source}: rope.scaling.original_context_length must be a non-negative int32")
    if not math.isfinite(out["yarn_log_mul"]):
        raise MetadataError(f"{source}: rope.scaling.yarn_log_multiplier must be finite")
    return out


def frequencies(cfg, base_inv: np.ndarray, freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(inv_freq float64 (rope_dim/2,), m) for cfg: base_inv (base^(-2i/d)) divided by the file's
    per-dimension factors, then scaled; m multiplies q and k (the attention scale by m^2)."""
    inv = np.asarray(base_inv, np.float64).copy()
    if freq_factors is not None:
        inv /= np.asarray(freq_factors, np.float64)
    m = float(cfg.rope_attn_factor)
    if cfg.rope_scaling == "linear":
        inv /= cfg.rope_factor
    elif cfg.rope_scaling == "yarn":
        factor = cfg.rope_factor
        d = cfg.rope_dim
        n_orig = cfg.rope_orig_ctx or cfg.n_ctx_train
        lb = 2 * math.log(cfg.rope_base)

        def corr(n_rot):                      # the dimension whose wavelength spans n_rot turns in n_orig
            return d * math.log(n_orig / (n_rot * 2 * math.pi)) / lb
        lo = max(0.0, math.floor(corr(cfg.yarn_beta_fast)))
        hi = min(d - 1.0, math.ceil(corr(cfg.yarn_beta_slow)))
        i = np.arange(d // 2, dtype=np.float64)
        extrap = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)   # 1: keep, 0: interpolate
        inv = inv / factor * (1.0 - extrap) + inv * extrap

        def mscale(s, k):
            return 1.0 if s <= 1.0 else 0.1 * k * math.log(s) + 1.0
        # llama.cpp: get_mscale(s, 1) / get_mscale(s, yarn_log_multiplier) when the file has that
        # multiplier (DeepSeek-style), else get_mscale(s, 1) = 1 + 0.1 ln s (transformers' default)
        m *= mscale(factor, 1.0) / (mscale(factor, cfg.yarn_log_mul) if cfg.yarn_log_mul else 1.0)
    return inv, m
