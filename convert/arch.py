"""Per-architecture knowledge: config.json -> hyperparameters, HF tensor names -> GGUF names and shapes.

    ARCHS[hf architecture] -> ArchSpec       (MistralForCausalLM is an alias of the llama path)
    HParams.from_config(cfg, path)            validated hyperparameters (ConvertError on bad input)
    map_tensor(spec, hp, hf_name)             -> Mapped(gguf name, expected shape, permute heads) | None

Tensor names follow llama.cpp (gguf-py's TensorNameMap for LLAMA/QWEN2/QWEN3/GEMMA3/PHI3/SMOLLM3):
  model.embed_tokens -> token_embd, model.norm -> output_norm, lm_head -> output,
  model.layers.N.{input_layernorm -> attn_norm, self_attn.{q,k,v,o}_proj -> attn_{q,k,v,output},
  post_attention_layernorm -> ffn_norm, mlp.{gate,up,down}_proj -> ffn_{gate,up,down}}  -> blk.N.*
phi3 keeps its checkpoint's fused self_attn.qkv_proj -> attn_qkv and mlp.gate_up_proj -> ffn_up (gate
rows first) and adds rope_factors_{long,short}.weight for LongRoPE; smollm3 is llama's path renamed.
llama and smollm3 (not qwen2) store q/k rows permuted for ggml's RoPE: within each head, rows (pairs i, i+hd/2)
become interleaved (i -> 2i, i+hd/2 -> 2i+1), as llama.cpp's LlamaModel.permute does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from infer.errors import ConvertError, UnsupportedError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    permute_qk: bool          # llama: q/k rows permuted for RoPE
    qkv_bias: bool            # qwen2: q/k/v biases required
    vocab_and_rope_dim: bool  # llama writes {arch}.vocab_size and rope.dimension_count
    always_head_dim: bool     # llama: attention.key_length/value_length always written
    qk_norm: bool = False     # qwen3: self_attn.{q,k}_norm -> attn_{q,k}_norm (per-head RMSNorm weights)
    gemma: bool = False       # gemma3: pre/post norms, RMSNorm weights stored as 1 + w, tied, sliding window
    phi3: bool = False        # phi3: fused qkv_proj / gate_up_proj, LongRoPE factor tensors, partial rotary
    nope: bool = False        # smollm3: every 4th layer without RoPE (config no_rope_layers, checked)


LLAMA = ArchSpec("llama", permute_qk=True, qkv_bias=False, vocab_and_rope_dim=True, always_head_dim=True)
QWEN2 = ArchSpec("qwen2", permute_qk=False, qkv_bias=True, vocab_and_rope_dim=False, always_head_dim=False)
QWEN3 = ArchSpec("qwen3", permute_qk=False, qkv_bias=False, vocab_and_rope_dim=False, always_head_dim=False,
                 qk_norm=True)
GEMMA3 = ArchSpec("gemma3", permute_qk=False, qkv_bias=False, vocab_and_rope_dim=False, always_head_dim=True,
                  qk_norm=True, gemma=True)
# llama.cpp's Phi3MiniModel: the checkpoint's fused tensors kept as they are (attn_qkv, ffn_up = gate|up)
PHI3 = ArchSpec("phi3", permute_qk=False, qkv_bias=False, vocab_and_rope_dim=False, always_head_dim=False,
                phi3=True)
# llama.cpp's SmolLM3Model is its LlamaModel (q/k permuted, vocab_size, rope.dimension_count) under another name
# smollm3: no key_length / value_length unless the config has head_dim (llama.cpp reads the config
# through transformers, whose SmolLM3Config has none; LlamaConfig fills it in, hence llama's keys)
SMOLLM3 = ArchSpec("smollm3", permute_qk=True, qkv_bias=False, vocab_and_rope_dim=True, always_head_dim=False,
                   nope=True)
ARCHS = {"LlamaForCausalLM": LLAMA, "LLaMAForCausalLM": LLAMA, "MistralForCausalLM": LLAMA,
         "Qwen2ForCausalLM": QWEN2, "Qwen3ForCausalLM": QWEN3, "Gemma3ForCausalLM": GEMMA3,
         "Phi3ForCausalLM": PHI3, "SmolLM3ForCausalLM": SMOLLM3}
NOPE_STEP = 4       # llama.cpp's smollm3 loader: layer il has no RoPE when (il + 1) % 4 == 0

# transformers' defaults for keys a config.json may leave out (llama.cpp reads configs through them)
DEFAULTS = {"llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
            "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
            "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
            "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
            "gemma3_text": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
            "gemma3": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
            "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
            "smollm3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 2000000.0}}


def _find(cfg: dict, keys, default=None):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


@dataclass(frozen=True)
class HParams:
    hf_arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_in_config: bool
    n_vocab: int
    n_ctx: int | None
    rope_theta: float | None
    rms_eps: float | None
    rope: dict                 # rope_parameters / rope_scaling (type, factor, ...)
    tie_embeddings: bool | None
    attention_bias: bool
    raw: dict = field(default_factory=dict, compare=False, repr=False)   # config.json as read
    rope_theta_swa: float | None = None   # sliding-window layers' RoPE base (Gemma 3's rope_local_base_freq)

    @classmethod
    def from_config(cls, cfg: dict, path: Path) -> tuple["HParams", ArchSpec]:
        if not isinstance(cfg, dict):
            raise ConvertError(f"{path}: not a JSON object")
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConvertError(f"{path}: no \"architectures\" list")
        hf_arch = archs[0]
        spec = ARCHS.get(hf_arch)
        if spec is None:
            raise UnsupportedError(f"{path}: unknown architecture {hf_arch!r} (supported: {', '.join(sorted(ARCHS))})")
        defaults = DEFAULTS.get(cfg.get("model_type"), DEFAULTS[spec.gguf_arch])

        def need(keys, what):
            v = _find(cfg, keys)
            if v is None:
                raise ConvertError(f"{path}: missing {keys[0]!r} ({what})")
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConvertError(f"{path}: {keys[0]!r} must be a positive integer, not {v!r}")
            return v

        n_layer = need(["num_hidden_layers", "n_layers", "n_layer", "num_layers"], "number of layers")
        n_embd = need(["hidden_size", "n_embd", "dim"], "embedding size")
        n_ff = need(["intermediate_size", "n_inner", "hidden_dim"], "feed-forward size")
        n_head = need(["num_attention_heads", "n_head", "n_heads"], "attention heads")
        n_vocab = need(["vocab_size"], "vocabulary size")
        n_head_kv = _find(cfg, ["num_key_value_heads", "n_kv_heads"], n_head)
        if not isinstance(n_head_kv, int) or n_head_kv <= 0 or n_head % n_head_kv:
            raise ConvertError(f"{path}: num_key_value_heads {n_head_kv!r} does not divide num_attention_heads {n_head}")
        hd = cfg.get("head_dim")
        if hd is None:
            if n_embd % n_head:
                raise ConvertError(f"{path}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
            hd = n_embd // n_head
        elif not isinstance(hd, int) or hd <= 0:
            raise ConvertError(f"{path}: head_dim must be a positive integer, not {hd!r}")
        if hd % 2:
            raise ConvertError(f"{path}: head_dim {hd} is odd (RoPE needs an even head size)")
        n_ctx = _find(cfg, ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                            "max_sequence_length", "model_max_length"], defaults["max_position_embeddings"])
        rope = cfg.get("rope_parameters", cfg.get("rope_scaling")) or {}
        if not isinstance(rope, dict):
            raise ConvertError(f"{path}: rope_scaling must be an object, not {rope!r}")
        rope = dict(rope.get("full_attention", rope))     # per-layer-type rope_parameters: the global layers'
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        theta = rope.get("rope_theta", _find(cfg, ["rope_theta", "rotary_emb_base"], defaults["rope_theta"]))
        eps = _find(cfg, ["rms_norm_eps", "norm_eps"], defaults["rms_norm_eps"])
        # the sliding-window layers' base, where llama.cpp's converter finds it: rope_parameters'
        # sliding_attention entry (configs saved by transformers 5), else one of the flat keys
        rp = cfg.get("rope_parameters", cfg.get("rope_scaling")) or {}
        if "full_attention" in rp or "sliding_attention" in rp:
            sa = rp.get("sliding_attention")
            swa = sa.get("rope_theta") if isinstance(sa, dict) else None
        else:
            swa = _find(cfg, ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                              "rope_local_base_freq"])
        for name, v in (("rope_theta", theta), ("rms_norm_eps", eps), ("rope_local_base_freq", swa)):
            if v is None and name == "rope_local_base_freq":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConvertError(f"{path}: {name} must be a positive number, not {v!r}")
        tie = cfg.get("tie_word_embeddings")
        if spec.nope:
            _check_nope(cfg, n_layer, path)
        if spec.phi3 and hd * n_head != n_embd:
            raise UnsupportedError(f"{path}: head_dim {hd} is not hidden_size / num_attention_heads: llama.cpp's "
                                   f"phi3 writes no key for it")
        return cls(hf_arch, n_layer, n_embd, n_ff, n_head, n_head_kv, hd, "head_dim" in cfg, n_vocab,
                   n_ctx, float(theta), float(eps), rope, tie if isinstance(tie, bool) else None,
                   bool(cfg.get("attention_bias", False)), dict(cfg),
                   None if swa is None else float(swa)), spec


@dataclass(frozen=True)
class Mapped:
    name: str              # GGUF name
    shape: tuple           # expected numpy shape
    permute_heads: int     # 0, or the number of heads whose rows get the RoPE permutation
    required: bool
    shift: float = 0.0     # added to every value (Gemma's RMSNorm weights are stored as 1 + w)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
SKIPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def layer_tensors(spec: ArchSpec, hp: HParams, i: int) -> dict[str, Mapped]:
    q, kv, e, ff = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_embd, hp.n_ff
    pq = hp.n_head if spec.permute_qk else 0
    pk = hp.n_head_kv if spec.permute_qk else 0
    b = f"blk.{i}."
    m = {
        "input_layernorm.weight": Mapped(b + "attn_norm.weight", (e,), 0, True),
        "self_attn.q_proj.weight": Mapped(b + "attn_q.weight", (q, e), pq, True),
        "self_attn.k_proj.weight": Mapped(b + "attn_k.weight", (kv, e), pk, True),
        "self_attn.v_proj.weight": Mapped(b + "attn_v.weight", (kv, e), 0, True),
        "self_attn.o_proj.weight": Mapped(b + "attn_output.weight", (e, q), 0, True),
        "post_attention_layernorm.weight": Mapped(b + "ffn_norm.weight", (e,), 0, True),
        "mlp.gate_proj.weight": Mapped(b + "ffn_gate.weight", (ff, e), 0, True),
        "mlp.up_proj.weight": Mapped(b + "ffn_up.weight", (ff, e), 0, True),
        "mlp.down_proj.weight": Mapped(b + "ffn_down.weight", (e, ff), 0, True),
    }
    if spec.phi3:       # the fused tensors as llama.cpp's tensor map names them
        for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            del m[k]
        m["self_attn.qkv_proj.weight"] = Mapped(b + "attn_qkv.weight", (q + 2 * kv, e), 0, True)
        m["mlp.gate_up_proj.weight"] = Mapped(b + "ffn_up.weight", (2 * ff, e), 0, True)
        return m
    bias_required = spec.qkv_bias or hp.attention_bias
    m["self_attn.q_proj.bias"] = Mapped(b + "attn_q.bias", (q,), pq, bias_required)
    m["self_attn.k_proj.bias"] = Mapped(b + "attn_k.bias", (kv,), pk, bias_required)
    m["self_attn.v_proj.bias"] = Mapped(b + "attn_v.bias", (kv,), 0, bias_required)
    m["self_attn.o_proj.bias"] = Mapped(b + "attn_output.bias", (e,), 0, hp.attention_bias and not spec.qkv_bias)
    sh = 1.0 if spec.gemma else 0.0
    if spec.qk_norm:
        m["self_attn.q_norm.weight"] = Mapped(b + "attn_q_norm.weight", (hp.head_dim,), 0, True, sh)
        m["self_attn.k_norm.weight"] = Mapped(b + "attn_k_norm.weight", (hp.head_dim,), 0, True, sh)
    if spec.gemma:      # llama.cpp's names for Gemma's four norms (its converter adds the 1)
        m["input_layernorm.weight"] = Mapped(b + "attn_norm.weight", (e,), 0, True, sh)
        m["post_attention_layernorm.weight"] = Mapped(b + "post_attention_norm.weight", (e,), 0, True, sh)
        m["pre_feedforward_layernorm.weight"] = Mapped(b + "ffn_norm.weight", (e,), 0, True, sh)
        m["post_feedforward_layernorm.weight"] = Mapped(b + "post_ffw_norm.weight", (e,), 0, True, sh)
    return m


def global_tensors(hp: HParams, spec: ArchSpec | None = None) -> dict[str, Mapped]:
    sh = 1.0 if spec is not None and spec.gemma else 0.0
    return {
        "model.embed_tokens.weight": Mapped("token_embd.weight", (hp.n_vocab, hp.n_embd), 0, True),
        "model.norm.weight": Mapped("output_norm.weight", (hp.n_embd,), 0, True, sh),
        # tied embeddings: no lm_head; required only when config says the embeddings are not tied
        "lm_head.weight": Mapped("output.weight", (hp.n_vocab, hp.n_embd), 0, hp.tie_embeddings is False),
    }


def map_tensor(spec: ArchSpec, hp: HParams, hf_name: str) -> Mapped | None:
    """GGUF mapping of checkpoint tensor `hf_name`; None for tensors llama.cpp drops; ConvertError if unknown."""
    if hf_name.endswith(SKIPPED):
        return None
    g = global_tensors(hp, spec).get(hf_name)
    if g is not None:
        return g
    m = _LAYER.match(hf_name)
    if m:
        i = int(m.group(1))
        if i >= hp.n_layer:
            raise ConvertError(f"tensor {hf_name!r} is for layer {i} but config.json has num_hidden_layers = {hp.n_layer}")
        t = layer_tensors(spec, hp, i).get(m.group(2))
        if t is not None:
            return t
    raise ConvertError(f"unexpected tensor {hf_name!r} for {hp.hf_arch} (cannot map it to a GGUF name)")


def expected_tensors(spec: ArchSpec, hp: HParams) -> dict[str, Mapped]:
    """Every HF tensor name this architecture can have -> mapping (required flag included)."""
    out = dict(global_tensors(hp))
    for i in range(hp.n_layer):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer_tensors(spec, hp, i).items()})
    return out


def _check_nope(cfg: dict, n_layer: int, path) -> None:
    """SmolLM3's NoPE layers: llama.cpp writes no per-layer key and its loader hard-codes every
    NOPE_STEP-th layer, so a config with another pattern cannot be converted faithfully."""
    want = [int((i + 1) % NOPE_STEP != 0) for i in range(n_layer)]
    layers = cfg.get("no_rope_layers")
    if layers is None:
        step = cfg.get("no_rope_layer_interval", NOPE_STEP)
        layers = [int((i + 1) % step != 0) for i in range(n_layer)] if isinstance(step, int) and step > 0 else step
    if not isinstance(layers, list) or [int(v) if isinstance(v, (int, bool)) else v for v in layers] != want:
        raise UnsupportedError(f"{path}: no_rope_layers {layers!r} is not llama.cpp's smollm3 pattern (RoPE off on "
                               f"every {NOPE_STEP}th layer), the only one its GGUF can express")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise UnsupportedError(f"{path}: use_sliding_window is set (or a layer type is sliding_attention): SmolLM3 "
                               f"sliding-window attention is not supported (llama.cpp's smollm3 has none)")


def phi3_rope(hp: HParams, path) -> dict:
    """Phi-3's RoPE as llama.cpp's Phi3MiniModel writes it: rope dimensions, the original context,
    and for LongRoPE the attention factor and the two factor lists."""
    rope = dict(hp.rope)
    orig = rope.get("original_max_position_embeddings", hp.raw.get("original_max_position_embeddings"))
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise ConvertError(f"{path}: missing original_max_position_embeddings (Phi-3's original context), got {orig!r}")
    pct = rope.get("partial_rotary_factor", hp.raw.get("partial_rotary_factor", 1.0))
    if not isinstance(pct, (int, float)) or isinstance(pct, bool) or not 0 < pct <= 1:
        raise ConvertError(f"{path}: partial_rotary_factor must be in (0, 1], not {pct!r}")
    rope_dims = int(pct * hp.n_embd) // hp.n_head
    if rope_dims % 2 or rope_dims > hp.head_dim:
        raise ConvertError(f"{path}: partial_rotary_factor {pct} gives {rope_dims} rotary dimensions for heads of "
                           f"{hp.head_dim} (must be even and fit)")
    out = {"orig_ctx": orig, "rope_dims": rope_dims, "attn_factor": None, "long": None, "short": None}
    kind = str(rope.get("rope_type", "") or "").lower()
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if kind in ("", "default") and not long:
        return out
    if kind not in ("su", "longrope"):
        raise UnsupportedError(f"{path}: Phi-3 rope type {kind or None!r} is not supported (default, longrope)")
    n = rope_dims // 2
    for name, f in (("long_factor", long), ("short_factor", short)):
        if not isinstance(f, list) or len(f) != n or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in f):
            raise ConvertError(f"{path}: rope_scaling.{name} must be {n} positive numbers (rotary dimensions / 2)")
    scale = (hp.n_ctx or 0) / orig
    att = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    given = rope.get("attention_factor")
    if given is not None and not math.isclose(float(given), att, rel_tol=1e-6):
        raise UnsupportedError(f"{path}: rope_scaling.attention_factor {given} differs from the one llama.cpp's "
                               f"converter derives ({att:.6g}); its GGUF would not match transformers")
    out.update(attn_factor=att, long=[float(v) for v in long], short=[float(v) for v in short])
    return out


def llama3_rope_factors(hp: HParams) -> list[float] | None:
    """rope_freqs.weight for rope_type llama3, as llama.cpp's generate_extra_tensors computes it."""
    if str(hp.rope.get("rope_type", "")).lower() != "llama3":
        return None
    import numpy as np
    base = hp.rope.get("rope_theta", hp.rope_theta)
    dim = hp.head_dim
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = hp.rope.get("factor", 8.0)
    lo = hp.rope.get("low_freq_factor", 1.0)
    hi = hp.rope.get("high_freq_factor", 4.0)
    old = hp.rope.get("original_max_position_embeddings", 8192)
    lo_wav, hi_wav = old / lo, old / hi
    f32 = np.float32
    out = []
    for f in freqs.astype(np.float32):            # float32 throughout, as the torch code computes it
        wav = f32(2 * math.pi) / f
        if wav < hi_wav:
            out.append(1.0)
        elif wav > lo_wav:
            out.append(float(factor))
        else:
            smooth = (f32(old) / wav - f32(lo)) / f32(hi - lo)
            out.append(float(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)))
    return out
