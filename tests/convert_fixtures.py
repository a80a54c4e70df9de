"""Tiny Hugging Face checkpoints made on the fly for the converter tests, and a float64 reference forward.

    make_llama_spm(dir)   LlamaForCausalLM, bf16 weights, SentencePiece tokenizer.model trained here
    make_llama_bpe(dir)   LlamaForCausalLM, f16 weights in 2 shards + index, BPE tokenizer.json (llama-bpe)
    make_qwen2(dir)       Qwen2ForCausalLM, f32 weights, q/k/v biases, tied embeddings, BPE (qwen2)
    make_qwen3(dir)       Qwen3ForCausalLM, f16 weights, q/k norms, head_dim 32 != hidden/heads, BPE
    make_mistral(dir)     MistralForCausalLM (llama path), f16, head_dim 32 != hidden/heads, no window, SPM
    make_llama3_rope(dir) LlamaForCausalLM with rope_scaling llama3 (Llama 3.x), f16, BPE
    make_llama_linear(dir), make_llama_yarn(dir)   the same with rope_scaling linear / yarn
    make_gemma3(dir)      Gemma3ForCausalLM (below), sliding window 8 and two RoPE bases, SPM
    make_gemma3_rope_params(dir)   the same weights, transformers 5's rope_parameters, local base 20000
    make_phi3, make_smollm3: their families' fixtures (Phi-3 with its own reference;
                          reference_logits follows SmolLM3's no_rope_layers)
    FAMILY_MAKERS, family_reference(name)   the family goldens' fixtures and each one's reference
    reference_logits(dir, ids) -> float64 [len(ids), n_vocab], straight from the safetensors weights
    weights_sha256(dir)   hash of the tensors (names, shapes, values) whatever the storage dtype
    gguf_digest(path)     a GGUF's metadata and tensors as JSON-able lists (long arrays and tensor data hashed)

All weights are exactly representable in float16, so an f16 conversion is lossless and a runtime's
logits can be compared to the float64 forward at 1e-3. Fixed seeds: the folders are the same on
every run.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

TEXT = """The quick brown fox jumps over the lazy dog. A small model reads a small text.
Once upon a time there was a little robot who liked to count: one, two, three, 42, 1999.
Hello world! How are you today? I am fine, thank you. Numbers like 3.14 and 2.71 are famous.
She said: "Let's go to the market and buy apples, bread, and cheese." They walked together.
Rivers flow to the sea; mountains rise to the sky. The weather was cold, then warm again.
Programming in Python is fun: def f(x): return x * 2. Lists, dicts and sets are useful.
"""

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def _f16_exact(a: np.ndarray, bf16: bool = False) -> np.ndarray:
    """float32 values exact in float16 (and in bfloat16 if asked): no subnormals, 7-bit mantissas."""
    a = a.astype(np.float32)
    a[np.abs(a) < 2.0 ** -13] = 0.0
    if bf16:
        u = a.view(np.uint32)
        u = (u + np.uint32(0x8000)) & np.uint32(0xFFFF0000)     # round to bf16 (no ties at these values)
        a = u.view(np.float32)
    return a.astype(np.float16).astype(np.float32)


def make_weights(cfg: dict, seed: int, bias: bool, tied: bool, bf16: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    e, ff, nh, nkv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", e // nh)
    V, L = cfg["vocab_size"], cfg["num_hidden_layers"]

    def mat(r, c, scale):
        return _f16_exact(rng.standard_normal((r, c)) * scale, bf16)

    def vec(n, center, scale):
        return _f16_exact(center + rng.standard_normal(n) * scale, bf16)

    w = {"model.embed_tokens.weight": mat(V, e, 0.5), "model.norm.weight": vec(e, 1.0, 0.1)}
    if not tied:
        w["lm_head.weight"] = mat(V, e, 0.1)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(e, 1.0, 0.1)
        w[p + "post_attention_layernorm.weight"] = vec(e, 1.0, 0.1)
        w[p + "self_attn.q_proj.weight"] = mat(nh * hd, e, 0.15)
        w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, e, 0.15)
        w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, e, 0.15)
        w[p + "self_attn.o_proj.weight"] = mat(e, nh * hd, 0.15)
        w[p + "mlp.gate_proj.weight"] = mat(ff, e, 0.15)
        w[p + "mlp.up_proj.weight"] = mat(ff, e, 0.15)
        w[p + "mlp.down_proj.weight"] = mat(e, ff, 0.15)
        if cfg["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = vec(hd, 1.0, 0.2)
            w[p + "self_attn.k_norm.weight"] = vec(hd, 1.0, 0.2)
        if bias:
            w[p + "self_attn.q_proj.bias"] = vec(nh * hd, 0.0, 0.2)
            w[p + "self_attn.k_proj.bias"] = vec(nkv * hd, 0.0, 0.2)
            w[p + "self_attn.v_proj.bias"] = vec(nkv * hd, 0.0, 0.2)
    return w


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 `tensors` as F32/F16/BF16 safetensors (bf16 by hand: numpy has none)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if dtype == "F32":
            raw = a.tobytes()
        elif dtype == "F16":
            raw = a.astype("<f2").tobytes()
        else:
            raw = (a.view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def _config(arch: str, model_type: str, vocab: int, **extra) -> dict:
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_size": 64, "intermediate_size": 96,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": vocab,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "hidden_act": "silu", "torch_dtype": "float32"}
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def train_spm(path: Path, vocab_size: int = 320) -> int:
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = [ln for ln in TEXT.splitlines() if ln] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
                                   minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp.vocab_size()


def train_bpe(path: Path, regex: str, specials: list[str], vocab_size: int, bos: str | None) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 3, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------
# the three fixtures
# ---------------------------------------------------------------------------------------------
def make_llama_spm(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    n = train_spm(d / "tokenizer.model")
    cfg = _config("LlamaForCausalLM", "llama", n, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, 1, False, False, bf16=True), "BF16")
    return d


def make_llama_bpe(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    n = train_bpe(d / "tokenizer.json", LLAMA3_REGEX, specials, 400, bos="<|begin_of_text|>")
    cfg = _config("LlamaForCausalLM", "llama", n, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
                  rope_theta=500000.0)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    w = make_weights(cfg, 2, False, False, bf16=False)
    names = sorted(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fn, ns in shards.items():
        save_safetensors(d / fn, {k: w[k] for k in ns}, "F16")
        weight_map.update({k: fn for k in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def make_qwen2(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n = train_bpe(d / "tokenizer.json", QWEN2_REGEX, specials, 380, bos=None)
    cfg = _config("Qwen2ForCausalLM", "qwen2", n, bos_token_id=0, eos_token_id=2, tie_word_embeddings=True,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, sliding_window=256, use_sliding_window=False)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_prefix_space": False, "chat_template": CHAT_TEMPLATE}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, 3, True, True, bf16=False), "F32")
    return d


def make_qwen3(d: Path) -> Path:
    """Qwen3ForCausalLM: per-head q/k RMSNorm, no biases, head_dim (32) independent of
    hidden_size / heads (16), untied f16 weights."""
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n = train_bpe(d / "tokenizer.json", QWEN2_REGEX, specials, 380, bos=None)
    cfg = _config("Qwen3ForCausalLM", "qwen3", n, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
                  head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_prefix_space": False, "chat_template": CHAT_TEMPLATE}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, 4, False, False, bf16=False), "F16")
    return d


MAKERS = {"llama_spm": make_llama_spm, "llama_bpe": make_llama_bpe, "qwen2": make_qwen2, "qwen3": make_qwen3}


def make_mistral(d: Path) -> Path:
    """MistralForCausalLM as Mistral Nemo / v0.3 ship it: head_dim (32) set apart from hidden_size /
    heads (16), no sliding window (null), rope_theta 1e6, untied f16 weights, SentencePiece."""
    d.mkdir(parents=True, exist_ok=True)
    n = train_spm(d / "tokenizer.model")
    cfg = _config("MistralForCausalLM", "mistral", n, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  head_dim=32, rope_theta=1000000.0, sliding_window=None)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, 6, False, False, bf16=False), "F16")
    return d


def _make_llama_scaled(d: Path, rope_scaling: dict, seed: int) -> Path:
    """llama-bpe LlamaForCausalLM (one f16 shard) with config.json's rope_scaling; the original
    context (64) is short, so the scaled dimensions turn visibly within a 40-token prompt."""
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    n = train_bpe(d / "tokenizer.json", LLAMA3_REGEX, specials, 400, bos="<|begin_of_text|>")
    cfg = _config("LlamaForCausalLM", "llama", n, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
                  rope_theta=500000.0, rope_scaling=rope_scaling)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, seed, False, False, bf16=False), "F16")
    return d


def make_llama3_rope(d: Path) -> Path:
    """Llama 3.x rope_scaling (rope_type llama3: per-dimension factors, llama.cpp's rope_freqs.weight)."""
    return _make_llama_scaled(d, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 8)


def make_llama_linear(d: Path) -> Path:
    """rope_scaling linear (position interpolation by 4), the older "type" spelling."""
    return _make_llama_scaled(d, {"type": "linear", "factor": 4.0}, 9)


def make_llama_yarn(d: Path) -> Path:
    """rope_scaling yarn (factor 4 over an original context of 64; transformers' default attention
    factor 0.1 ln 4 + 1 on cos and sin)."""
    return _make_llama_scaled(d, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 10)


# ---------------------------------------------------------------------------------------------
# float64 reference forward of the original weights (Hugging Face semantics, no permutation)
# ---------------------------------------------------------------------------------------------
def load_weights(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for name, m in header.items():
            if name == "__metadata__":
                continue
            b, e = m["data_offsets"]
            buf = raw[8 + n + b:8 + n + e]
            if m["dtype"] == "BF16":
                a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(buf, {"F16": "<f2", "F32": "<f4"}[m["dtype"]])
            out[name] = a.astype(np.float64).reshape(m["shape"])
    return out


def weights_sha256(d: Path) -> str:
    """sha256 over every tensor of the folder, by name: name, shape, float32 little-endian values
    (so the same checkpoint stored as BF16/F16/F32 or in other shards hashes the same)."""
    import hashlib
    h = hashlib.sha256()
    for name, a in sorted(load_weights(d).items()):
        h.update(f"{name}:{list(a.shape)}:".encode())
        h.update(np.ascontiguousarray(a, "<f4").tobytes())
    return h.hexdigest()


def gguf_digest(path) -> dict:
    """{"kv": [[key, value types, value]], "tensors": [[name, type, shape, sha256 of the data]]} in
    file order, GGUF.* header fields left out; a list value longer than 8 is [len, sha256 of its JSON]."""
    import hashlib
    import gguf
    r = gguf.GGUFReader(path)
    kv = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 8:
            v = [len(v), hashlib.sha256(json.dumps(v, ensure_ascii=False).encode()).hexdigest()]
        kv.append([k, [int(t) for t in f.types], v])
    tensors = [[t.name, t.tensor_type.name, [int(s) for s in t.shape],
                hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()] for t in r.tensors]
    return {"kv": kv, "tensors": tensors}


def hf_rope_frequencies(cfg: dict, hd: int) -> tuple[np.ndarray, float]:
    """(inv_freq, attention factor on cos/sin) as transformers' modeling_rope_utils computes them
    for config.json's rope_scaling: default, linear, llama3, yarn (float64 here)."""
    theta = cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    factor = float(rs["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    old = rs.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if kind == "llama3":
        lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
        wav = 2 * np.pi / inv
        llama = np.where(wav > old / lo, inv / factor, inv)
        smooth = (old / wav - lo) / (hi - lo)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wav < old / hi) & ~(wav > old / lo)
        return np.where(medium, smoothed, llama), 1.0
    if kind == "yarn":
        bf, bs = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0)

        def dim_of(rot):
            return hd * np.log(old / (rot * 2 * np.pi)) / (2 * np.log(theta))
        low, high = max(np.floor(dim_of(bf)), 0), min(np.ceil(dim_of(bs)), hd - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        keep = 1 - ramp
        att = rs.get("attention_factor", 0.1 * np.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv / factor * (1 - keep) + inv * keep, float(att)
    raise ValueError(f"rope type {kind!r} not in the reference")


def reference_logits(d: Path, ids: list[int]) -> np.ndarray:
    cfg = json.loads((d / "config.json").read_text())
    w = load_weights(d)
    e, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", e // nh)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv, mscale = hf_rope_frequencies(cfg, hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    cos, sin = cos * mscale, sin * mscale

    def rope(x):                     # x: (T, heads, hd), HF rotate_half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        rot = np.concatenate([-x2, x1], -1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = h @ w[p + "self_attn.q_proj.weight"].T + w.get(p + "self_attn.q_proj.bias", 0)
        k = h @ w[p + "self_attn.k_proj.weight"].T + w.get(p + "self_attn.k_proj.bias", 0)
        v = h @ w[p + "self_attn.v_proj.weight"].T + w.get(p + "self_attn.v_proj.bias", 0)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if p + "self_attn.q_norm.weight" in w:          # Qwen3: RMSNorm of each head, then RoPE
            q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
        if cfg.get("no_rope_layers", [1] * (i + 1))[i]:   # SmolLM3: use_rope = no_rope_layers[i]
            q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


# ---------------------------------------------------------------------------------------------
# Gemma 3 (its own maker and reference: four norms stored as w with 1 + w applied, GELU, sliding
# window layers with their own RoPE base, embeddings times sqrt(hidden))
# ---------------------------------------------------------------------------------------------
GEMMA3_WINDOW = 8


def make_gemma3(d: Path) -> Path:
    """Gemma3ForCausalLM, 6 layers (0-4 sliding over GEMMA3_WINDOW tokens, 5 global), head_dim 32,
    f16 weights, tied embeddings, SentencePiece tokenizer.model."""
    d.mkdir(parents=True, exist_ok=True)
    n = train_spm(d / "tokenizer.model")
    cfg = _config("Gemma3ForCausalLM", "gemma3_text", n, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                  num_hidden_layers=6, head_dim=32, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                  sliding_window=GEMMA3_WINDOW, sliding_window_pattern=6, query_pre_attn_scalar=32,
                  rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                  attn_logit_softcapping=None)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    rng = np.random.default_rng(7)
    e, ff, nh, nkv, hd = 64, 96, 4, 2, 32

    def mat(r, c, scale):
        return _f16_exact(rng.standard_normal((r, c)) * scale)

    def vec(k):
        return _f16_exact(rng.standard_normal(k) * 0.2)      # Gemma's norms multiply by 1 + w

    w = {"model.embed_tokens.weight": mat(n, e, 0.1), "model.norm.weight": vec(e)}
    for i in range(6):
        p = f"model.layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            w[p + k + ".weight"] = vec(e)
        w[p + "self_attn.q_norm.weight"] = vec(hd)
        w[p + "self_attn.k_norm.weight"] = vec(hd)
        w[p + "self_attn.q_proj.weight"] = mat(nh * hd, e, 0.15)
        w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, e, 0.15)
        w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, e, 0.15)
        w[p + "self_attn.o_proj.weight"] = mat(e, nh * hd, 0.15)
        w[p + "mlp.gate_proj.weight"] = mat(ff, e, 0.15)
        w[p + "mlp.up_proj.weight"] = mat(ff, e, 0.15)
        w[p + "mlp.down_proj.weight"] = mat(e, ff, 0.15)
    save_safetensors(d / "model.safetensors", w, "F16")
    return d


def make_gemma3_rope_params(d: Path) -> Path:
    """make_gemma3's checkpoint with config.json in transformers 5's form: rope_parameters per layer
    type instead of rope_theta / rope_local_base_freq, and a sliding layers' base of 20000 (not
    transformers' or llama.cpp's default 10000, so a converter dropping it is seen)."""
    make_gemma3(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_theta"], cfg["rope_local_base_freq"]
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def reference_logits_gemma3(d: Path, ids: list[int]) -> np.ndarray:
    """float64 forward with transformers' Gemma3ForCausalLM semantics (modeling_gemma3)."""
    cfg = json.loads((d / "config.json").read_text())
    w = load_weights(d)
    e, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, T, win = cfg["rms_norm_eps"], len(ids), cfg["sliding_window"]

    def rms(x, g):                    # Gemma3RMSNorm: x / rms * (1 + w)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + g)

    def rope_of(theta):
        inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

        def rope(x):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos[:, None, :] + np.concatenate([-x2, x1], -1) * sin[:, None, :]
        return rope
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:              # transformers 5's form: a RoPE entry per layer type
        rope_global = rope_of(rp["full_attention"]["rope_theta"])
        rope_local = rope_of(rp["sliding_attention"]["rope_theta"])
    else:
        rope_global, rope_local = rope_of(cfg["rope_theta"]), rope_of(cfg["rope_local_base_freq"])

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = w["model.embed_tokens.weight"][ids] * np.float32(np.sqrt(e))
    t = np.arange(T)
    causal = np.where(t[None, :] > t[:, None], -np.inf, 0.0)
    sliding = np.where((t[None, :] > t[:, None]) | (t[:, None] - t[None, :] >= win), -np.inf, 0.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        is_sliding = (i + 1) % cfg["sliding_window_pattern"] != 0
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
        rope = rope_local if is_sliding else rope_global
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) * cfg["query_pre_attn_scalar"] ** -0.5 + (sliding if is_sliding else causal)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = x + rms(o, w[p + "post_attention_layernorm.weight"])
        h = rms(x, w[p + "pre_feedforward_layernorm.weight"])
        f = (gelu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = x + rms(f, w[p + "post_feedforward_layernorm.weight"])
    x = rms(x, w["model.norm.weight"])
    return x @ w["model.embed_tokens.weight"].T


# ---------------------------------------------------------------------------------------------
# Phi-3 (fused qkv_proj and gate_up_proj, LongRoPE with partial rotary) and SmolLM3 (NoPE layers)
# ---------------------------------------------------------------------------------------------
PHI3_ORIG_CTX = 256           # original_max_position_embeddings (a multiple of 256, as Phi-3's: llama.cpp
                              # compares it to n_ctx rounded up to 256); max_position_embeddings twice it
PHI3_SHORT = [1.0, 1.25, 1.5, 2.0]
PHI3_LONG = [1.0, 2.0, 6.0, 16.0]


def make_phi3(d: Path) -> Path:
    """Phi3ForCausalLM: 2 layers, head_dim 16 of which 8 rotate (partial_rotary_factor 0.5), GQA,
    LongRoPE (short / long factors, context 512 over an original 256: attention factor sqrt(1.125)),
    sliding_window 2047 as Phi-3 mini's config has it, f16 weights, SentencePiece tokenizer.model.
    pad_token_id is eos, as Phi-3's (32000 both): transformers' Phi3Config default (32000) is out of
    this vocabulary, and its nn.Embedding refuses a padding_idx past the table."""
    d.mkdir(parents=True, exist_ok=True)
    n = train_spm(d / "tokenizer.model")
    cfg = _config("Phi3ForCausalLM", "phi3", n, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=False,
                  max_position_embeddings=2 * PHI3_ORIG_CTX, original_max_position_embeddings=PHI3_ORIG_CTX,
                  partial_rotary_factor=0.5, sliding_window=2047, resid_pdrop=0.0,
                  rope_scaling={"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG})
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}))
    rng = np.random.default_rng(11)
    e, ff, nh, nkv, hd = 64, 96, 4, 2, 16

    def mat(r, c, scale):
        return _f16_exact(rng.standard_normal((r, c)) * scale)

    def vec(k):
        return _f16_exact(1.0 + rng.standard_normal(k) * 0.1)

    w = {"model.embed_tokens.weight": mat(n, e, 0.5), "model.norm.weight": vec(e), "lm_head.weight": mat(n, e, 0.1)}
    for i in range(2):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(e)
        w[p + "post_attention_layernorm.weight"] = vec(e)
        w[p + "self_attn.qkv_proj.weight"] = mat((nh + 2 * nkv) * hd, e, 0.25)
        w[p + "self_attn.o_proj.weight"] = mat(e, nh * hd, 0.15)
        w[p + "mlp.gate_up_proj.weight"] = mat(2 * ff, e, 0.15)
        w[p + "mlp.down_proj.weight"] = mat(e, ff, 0.15)
    save_safetensors(d / "model.safetensors", w, "F16")
    return d


def reference_logits_phi3(d: Path, ids: list[int]) -> np.ndarray:
    """float64 forward with transformers' Phi3ForCausalLM semantics (modeling_phi3): q|k|v and
    gate|up split from the fused projections, LongRoPE's factors chosen by the sequence length
    (long past original_max_position_embeddings), its attention factor on cos and sin, RoPE on the
    first partial_rotary_factor * head_dim dimensions, the sliding-window mask."""
    cfg = json.loads((d / "config.json").read_text())
    w = load_weights(d)
    e, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, ff = e // nh, cfg["intermediate_size"]
    rd = int(hd * cfg["partial_rotary_factor"])
    eps, T = cfg["rms_norm_eps"], len(ids)
    rs, orig = cfg["rope_scaling"], cfg["original_max_position_embeddings"]
    factor = cfg["max_position_embeddings"] / orig
    if rs:
        att = np.sqrt(1 + np.log(factor) / np.log(orig)) if factor > 1 else 1.0
        ext = np.asarray(rs["long_factor"] if T > orig else rs["short_factor"], np.float64)
    else:                       # rope_scaling null: plain RoPE (on the same partial dimensions)
        att, ext = 1.0, np.ones(rd // 2)
    inv = 1.0 / (ext * cfg["rope_theta"] ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)) * att, np.sin(np.concatenate([ang, ang], -1)) * att

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):
        r, rest = x[..., :rd], x[..., rd:]
        rot = np.concatenate([-r[..., rd // 2:], r[..., :rd // 2]], -1)
        return np.concatenate([r * cos[:, None, :] + rot * sin[:, None, :], rest], -1)

    t = np.arange(T)
    win = cfg.get("sliding_window") or T + 1
    mask = np.where((t[None, :] > t[:, None]) | (t[:, None] - t[None, :] >= win), -np.inf, 0.0)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = rms(x, w[p + "input_layernorm.weight"]) @ w[p + "self_attn.qkv_proj.weight"].T
        q = qkv[:, :nh * hd].reshape(T, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(T, nkv, hd)
        v = qkv[:, (nh + nkv) * hd:].reshape(T, nkv, hd)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        gu = rms(x, w[p + "post_attention_layernorm.weight"]) @ w[p + "mlp.gate_up_proj.weight"].T
        g, u = gu[:, :ff], gu[:, ff:]
        x = x + (u * (g / (1 + np.exp(-g)))) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def make_smollm3(d: Path) -> Path:
    """SmolLM3ForCausalLM: 4 layers, the 4th without RoPE (no_rope_layers [1, 1, 1, 0], its
    no_rope_layer_interval 4), GQA, tied f16 embeddings, BPE tokenizer.json (llama-bpe)."""
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    n = train_bpe(d / "tokenizer.json", LLAMA3_REGEX, specials, 400, bos=None)
    cfg = _config("SmolLM3ForCausalLM", "smollm3", n, bos_token_id=None, eos_token_id=3, pad_token_id=1,
                  tie_word_embeddings=True, num_hidden_layers=4, rope_theta=5000000.0, rms_norm_eps=1e-6,
                  no_rope_layers=[1, 1, 1, 0], no_rope_layer_interval=4, use_sliding_window=False,
                  sliding_window=None, attention_bias=False, mlp_bias=False)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>", "chat_template": CHAT_TEMPLATE}))
    save_safetensors(d / "model.safetensors", make_weights(cfg, 12, False, True, bf16=False), "F16")
    return d


# every family fixture the family goldens cover (tests/golden/make_family_goldens.py), in the
# goldens' order, and the float64 reference each is checked against
FAMILY_MAKERS = {**MAKERS, "mistral": make_mistral, "llama3_rope": make_llama3_rope,
                 "llama_linear": make_llama_linear, "llama_yarn": make_llama_yarn, "gemma3": make_gemma3,
                 "gemma3_rope_params": make_gemma3_rope_params, "phi3": make_phi3, "smollm3": make_smollm3}


def family_reference(name: str):
    """The float64 forward (dir, ids) -> logits for the FAMILY_MAKERS entry `name`."""
    if name.startswith("gemma3"):
        return reference_logits_gemma3
    return reference_logits_phi3 if name == "phi3" else reference_logits


# GGUF names -> Hugging Face names of the llama-style layer tensors (dequantized_copy)
HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_qkv": "self_attn.qkv_proj"}


def dequantized_copy(d: Path, gguf_path: Path, dst: Path) -> Path:
    """A copy of the HF folder d whose weights are those of the converted file gguf_path, decoded by
    the reference codecs (q/k rows un-permuted for llama-style files; phi3's ffn_up is gate_up_proj):
    the float64 references on it give what a quantized file computes exactly."""
    import shutil

    from infer.gguf_file import GGUFFile
    from infer.quant import codecs
    shutil.copytree(d, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    cfg = json.loads((d / "config.json").read_text())
    out = {}
    with GGUFFile(gguf_path) as g:
        arch = g.metadata["general.architecture"]
        for n, t in g.tensors.items():
            x = codecs.dequantize(g.raw(n), t.qtype).reshape(t.shape).astype(np.float32)
            if n.startswith("rope_factors_"):
                continue
            top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}.get(n)
            if top is not None:
                out[top] = x
                continue
            _, i, kind, _ = n.split(".")
            if kind in ("attn_q", "attn_k") and arch in ("llama", "smollm3"):
                nh = cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"]
                x = x.reshape(nh, x.shape[0] // nh // 2, 2, -1).swapaxes(1, 2).reshape(x.shape)
            name = "mlp.gate_up_proj" if (arch, kind) == ("phi3", "ffn_up") else HF_LAYER[kind]
            out[f"model.layers.{i}.{name}.weight"] = x
    save_safetensors(dst / "model.safetensors", out, "F32")
    return dst
