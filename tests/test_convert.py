"""`infer convert`: tiny checkpoints -> GGUF files re-read by gguf's GGUFReader and our GGUFFile."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gguf

import convert_fixtures as cf
from infer.convert import convert
from infer.convert.pipeline import make_plan, write_plan
from infer.errors import ConvertError, InferError
from infer.gguf_file import GGUFFile
from infer.quant import codecs, types


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make(root / name) for name, make in cf.MAKERS.items()}


def fields(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def permute(w, n_head):
    """llama.cpp's q/k permutation, written out by index: row h*hd + 2j + k <- row h*hd + k*hd/2 + j."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            for k in range(2):
                out[h * hd + 2 * j + k] = w[h * hd + k * hd // 2 + j]
    return out


# --------------------------------------------------------------------------------------------- metadata
EXPECTED = {
    "llama_spm": {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                  "llama.rope.freq_base": 10000.0, "tokenizer.ggml.add_bos_token": True,
                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2},
    "llama_bpe": {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                  "llama.rope.freq_base": 500000.0, "tokenizer.ggml.add_bos_token": True,
                  "tokenizer.ggml.add_sep_token": False, "tokenizer.ggml.bos_token_id": 0,
                  "tokenizer.ggml.eos_token_id": 2},
    "qwen2": {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
              "qwen2.rope.freq_base": 1000000.0, "tokenizer.ggml.add_bos_token": False,
              "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0},
    "qwen3": {"general.architecture": "qwen3", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
              "qwen3.rope.freq_base": 1000000.0, "tokenizer.ggml.add_bos_token": False,
              "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
              "qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32},
}


@pytest.mark.parametrize("name", list(cf.MAKERS))
def test_metadata_and_tensor_names(fixtures, tmp_path, name):
    src = fixtures[name]
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    s = convert(src, out, "q8_0")
    assert out.stat().st_size == s.n_bytes and s.n_tensors > 0
    kv, tensors = fields(out)
    arch = EXPECTED[name]["general.architecture"]
    for k, v in EXPECTED[name].items():
        got = kv[k]
        assert (abs(got - v) < 1e-6 * abs(v)) if isinstance(v, float) else got == v, k
    assert kv["general.type"] == "model" and kv["general.name"]
    assert kv[f"{arch}.block_count"] == 2 and kv[f"{arch}.embedding_length"] == 64
    assert kv[f"{arch}.feed_forward_length"] == 96 and kv[f"{arch}.context_length"] == 256
    assert kv[f"{arch}.attention.head_count"] == 4 and kv[f"{arch}.attention.head_count_kv"] == 2
    assert abs(kv[f"{arch}.attention.layer_norm_rms_epsilon"] - cfg["rms_norm_eps"]) < 1e-9
    assert kv["general.file_type"] == 7 and kv["general.quantization_version"] == 2
    assert len(kv["tokenizer.ggml.tokens"]) == cfg["vocab_size"] == len(kv["tokenizer.ggml.token_type"])
    assert kv["tokenizer.chat_template"] == cf.CHAT_TEMPLATE
    if arch == "llama":        # llama.cpp writes these for llama, not for qwen2
        assert kv["llama.vocab_size"] == cfg["vocab_size"] and kv["llama.rope.dimension_count"] == 16
        assert kv["llama.attention.key_length"] == 16
    else:
        assert f"{arch}.vocab_size" not in kv and f"{arch}.rope.dimension_count" not in kv
    if kv["tokenizer.ggml.model"] == "gpt2":
        assert len(kv["tokenizer.ggml.merges"]) > 10 and "tokenizer.ggml.scores" not in kv
    else:
        assert len(kv["tokenizer.ggml.scores"]) == cfg["vocab_size"] and "tokenizer.ggml.merges" not in kv
    # tensor names and types
    names = {"token_embd.weight", "output_norm.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if arch == "qwen2":
        names |= {f"blk.{i}.attn_{t}.bias" for i in range(2) for t in "qkv"}
    else:
        names.add("output.weight")
    if arch == "qwen3":
        names |= {f"blk.{i}.attn_{t}_norm.weight" for i in range(2) for t in "qk"}
    assert set(tensors) == names
    for n, t in tensors.items():
        want = "F32" if n.endswith(("_norm.weight", ".bias")) else "Q8_0"
        assert t.tensor_type.name == want, n
    # and our own reader agrees
    with GGUFFile(out) as g:
        assert set(g.tensors) == names
        assert g.metadata["general.architecture"] == arch
        assert g.tensors["token_embd.weight"].shape == (cfg["vocab_size"], 64)
        assert g.tensors["blk.0.attn_k.weight"].shape == (2 * cfg.get("head_dim", 16), 64)


@pytest.mark.parametrize("name", list(cf.MAKERS))
@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_tensor_data(fixtures, tmp_path, name, qtype):
    """Every tensor equals the reference codec applied to the (permuted, for llama q/k) original."""
    src = fixtures[name]
    w = {k: v.astype(np.float32) for k, v in cf.load_weights(src).items()}
    out = tmp_path / "m.gguf"
    convert(src, out, qtype)
    qt = types.qtype_by_name(qtype)
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
          "output_norm.weight": "model.norm.weight"}
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    with GGUFFile(out) as g:
        for n, t in g.tensors.items():
            if n in hf:
                x = w[hf[n]]
            else:
                _, i, kind, suffix = n.split(".")
                x = w[f"model.layers.{i}.{sub[kind]}.{suffix}"]
            if name not in ("qwen2", "qwen3") and n.split(".")[2:3] in (["attn_q"], ["attn_k"]):
                x = permute(x, 4 if "attn_q" in n else 2)
            want_t = types.F32 if x.ndim == 1 or n.endswith("_norm.weight") else qt
            assert t.qtype is want_t, n
            want = codecs.quantize(x.reshape(1, -1) if x.ndim == 1 else x, want_t)
            assert np.array_equal(g.raw(n).reshape(-1), want.reshape(-1)), n


def test_mixed_recipe(fixtures, tmp_path):
    out = tmp_path / "m.gguf"
    convert(fixtures["llama_bpe"], out, "q4_0_mixed")
    with GGUFFile(out) as g:
        t = {n: i.qtype.name for n, i in g.tensors.items()}
        assert g.metadata["general.file_type"] == 2
    assert t["token_embd.weight"] == t["output.weight"] == "Q8_0"
    assert t["blk.0.attn_v.weight"] == t["blk.1.attn_v.weight"] == "Q8_0"
    assert t["blk.1.ffn_down.weight"] == "Q8_0" and t["blk.0.ffn_down.weight"] == "Q4_0"  # use_more_bits(i, 2)
    assert t["blk.0.attn_q.weight"] == t["blk.1.ffn_up.weight"] == "Q4_0"
    assert t["blk.0.attn_norm.weight"] == "F32"


def test_row_fallback_to_f16(tmp_path):
    """A hidden size that is not a multiple of 32: matrices fall back to F16 as llama.cpp does."""
    d = tmp_path / "odd"
    d.mkdir()
    n = cf.train_bpe(d / "tokenizer.json", cf.LLAMA3_REGEX, ["<s>"], 300, bos=None)
    cfg = cf._config("LlamaForCausalLM", "llama", n, hidden_size=48, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1)
    (d / "config.json").write_text(json.dumps(cfg))
    cf.save_safetensors(d / "model.safetensors", cf.make_weights(cfg, 5, False, False, False), "F32")
    plan = make_plan(d, "q4_0")
    types_ = {t.name: t.qtype.name for t in plan.tensors}
    plan.checkpoint.close()
    assert types_["blk.0.attn_q.weight"] == "F16"                 # 48 columns
    assert types_["blk.0.ffn_down.weight"] == "Q4_0"              # 64 columns
    assert types_["token_embd.weight"] == "F16"


# --------------------------------------------------------------------------------------------- behaviour
def test_dry_run_writes_nothing_and_predicts_size(fixtures, tmp_path):
    out = tmp_path / "m.gguf"
    s = convert(fixtures["qwen2"], out, "q4_1", dry_run=True)
    assert s.dry_run and not out.exists() and list(tmp_path.iterdir()) == []
    plan = make_plan(fixtures["qwen2"], "q4_1")
    table = plan.table()
    plan.checkpoint.close()
    assert "blk.0.attn_q.bias" in table and "expected file size" in table
    s2 = convert(fixtures["qwen2"], out, "q4_1")
    assert out.stat().st_size == s.n_bytes == s2.n_bytes


def test_existing_output_refused_unless_force(fixtures, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(fixtures["llama_spm"], out, "f16")
    assert out.read_bytes() == b"keep me"
    convert(fixtures["llama_spm"], out, "f16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_progress_callback(fixtures, tmp_path):
    seen = []
    convert(fixtures["llama_bpe"], tmp_path / "m.gguf", "q8_0", progress=lambda n, d, t: seen.append((n, d, t)))
    assert seen[-1][1] == seen[-1][2] == (tmp_path / "m.gguf").stat().st_size
    assert {n for n, _, _ in seen} >= {"token_embd.weight", "blk.1.ffn_down.weight"}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_leaves_no_file(fixtures, tmp_path, monkeypatch, exc):
    import infer.convert.pipeline as p
    calls = []
    real = p._encode

    def boom(x, qt):
        calls.append(1)
        if len(calls) == 5:
            raise exc("stop")
        return real(x, qt)
    monkeypatch.setattr(p, "_encode", boom)
    with pytest.raises(exc):
        convert(fixtures["llama_spm"], tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_truncated_during_conversion(fixtures, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixtures["qwen2"], src)
    plan = make_plan(src, "q8_0")
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 1000)
    with pytest.raises(ConvertError, match="ended early"):
        write_plan(plan, tmp_path / "m.gguf")
    plan.checkpoint.close()
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_library_entry_point_is_light():
    import subprocess
    import sys
    code = "import sys, infer.convert; print('numba' in sys.modules, 'infer.convert.pipeline' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------- must-show 1
@pytest.mark.parametrize("name", list(cf.MAKERS))
def test_f16_logits_match_float64_reference(fixtures, tmp_path, name):
    import infer
    if not hasattr(infer, "LLM"):
        pytest.skip("infer.LLM (the runtime facade) does not exist yet")
    out = tmp_path / "m.gguf"
    convert(fixtures[name], out, "f16")
    ids = [1, 5, 17, 42, 3, 99, 7, 250, 11, 64, 2, 30]
    want = cf.reference_logits(fixtures[name], ids)
    llm = infer.LLM(str(out), n_ctx=64)
    try:
        got = np.asarray(llm.logits(ids), dtype=np.float64)
        llm.engine.reset()
        llm.engine.prefill(ids[:5], reuse=False)          # and token by token (the fused decode step)
        steps = np.stack([np.asarray(llm.engine.decode(t), np.float64).copy() for t in ids[5:]])
    finally:
        getattr(llm, "close", lambda: None)()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    assert np.abs(steps - want[5:]).max() < 1e-3, np.abs(steps - want[5:]).max()


def test_reference_forward_is_sane(fixtures):
    """The float64 reference itself: causal (a prefix's logits do not depend on what follows)."""
    ids = [3, 8, 13, 21, 34]
    for d in fixtures.values():
        full = cf.reference_logits(d, ids)
        assert np.allclose(cf.reference_logits(d, ids[:3]), full[:3], atol=1e-10)
        assert np.isfinite(full).all() and full.std() > 0.1


def test_errors_are_infer_errors():
    assert issubclass(ConvertError, InferError)


def test_package_is_callable(fixtures, tmp_path):
    """`infer.convert(...)` works whether `infer.convert` is the package or its function."""
    import infer
    import infer.convert as pkg
    import infer.convert.pipeline  # noqa: F401  (rebinding the parent attribute must not matter)
    s = pkg(fixtures["qwen2"], tmp_path / "a.gguf", "q8_0")
    assert s.n_tensors == 26 and (tmp_path / "a.gguf").exists()
    assert callable(infer.convert)
    s = infer.convert(fixtures["qwen2"], None, type="f16", dry_run=True)
    assert s.dry_run and s.type == "f16"


def _variant(src: Path, root: Path, edit) -> Path:
    d = root / src.name                      # same folder name: same general.name
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_mistral_is_the_llama_path(fixtures, tmp_path):
    d = _variant(fixtures["llama_spm"], tmp_path / "m", lambda c: c.update(architectures=["MistralForCausalLM"],
                                                                         model_type="mistral", sliding_window=4096))
    convert(fixtures["llama_spm"], tmp_path / "llama.gguf", "q8_0")
    convert(d, tmp_path / "mistral.gguf", "q8_0")
    assert (tmp_path / "llama.gguf").read_bytes() == (tmp_path / "mistral.gguf").read_bytes()


def test_rope_scaling_metadata_and_llama3_factors(fixtures, tmp_path):
    d = _variant(fixtures["llama_bpe"], tmp_path / "l3", lambda c: c.update(rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    convert(d, tmp_path / "l3.gguf", "q8_0")
    kv, tensors = fields(tmp_path / "l3.gguf")
    f = np.asarray(tensors["rope_freqs.weight"].data)
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32" and f.shape == (8,)
    freqs = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    wav = 2 * np.pi / freqs
    smooth = (64 / wav - 1) / 3
    want = np.where(wav < 16, 1.0, np.where(wav > 64, 32.0, 1 / ((1 - smooth) / 32 + smooth)))
    assert np.allclose(f, want, rtol=1e-5)
    assert "llama.rope.scaling.type" not in kv
    d = _variant(fixtures["qwen2"], tmp_path / "y", lambda c: c.update(rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
    convert(d, tmp_path / "y.gguf", "q8_0")
    kv, _ = fields(tmp_path / "y.gguf")
    assert kv["qwen2.rope.scaling.type"] == "yarn" and kv["qwen2.rope.scaling.factor"] == 4.0
    assert kv["qwen2.rope.scaling.original_context_length"] == 64


def test_non_finite_weights_refused_for_block_types(tmp_path):
    d = tmp_path / "nan" / "m"
    cf.make_qwen2(d)
    w = cf.load_weights(d)
    w["model.layers.1.mlp.up_proj.weight"][3, 7] = np.nan
    cf.save_safetensors(d / "model.safetensors", w, "F32")
    with pytest.raises(ConvertError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has a non-finite value \(nan\) in row 3"):
        convert(d, tmp_path / "o.gguf", "q4_0")
    assert not (tmp_path / "o.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
    convert(d, tmp_path / "o.gguf", "f32")             # float types keep the value as it is


# ------------------------------------------------------------------ RoPE scaling (issue 15, must-show 3)
ROPE_VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("kind", list(ROPE_VARIANTS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rope_scaling_runs_as_transformers_computes_it(fixtures, tmp_path, kind, n_threads):
    """A Llama 3.x / linear / YaRN-scaled model: the runtime's logits equal the float64 reference,
    whose frequencies follow transformers' rope utilities, at every position (decode and prefill);
    the same weights without scaling differ (so the scaling is really applied)."""
    import infer
    base = "qwen2" if kind == "yarn" else "llama_bpe"
    d = _variant(fixtures[base], tmp_path / kind, lambda c: c.update(rope_scaling=ROPE_VARIANTS[kind]))
    out = tmp_path / f"{kind}.gguf"
    convert(d, out, "f16")
    ids = [1, 5, 17, 42, 3, 99, 7, 250, 11, 64, 2, 30, 8, 120, 77, 5, 200, 33, 19, 4]
    want = cf.reference_logits(d, ids)
    plain = cf.reference_logits(fixtures[base], ids)
    assert np.abs(plain - want).max() > 0.05          # the scaling matters at these positions
    with infer.LLM(str(out), n_ctx=64, n_threads=n_threads, int8_activations=False) as llm:
        got = np.asarray(llm.logits(ids), dtype=np.float64)
        llm.engine.reset()
        llm.engine.prefill(ids[:7], reuse=False)        # prefill 7, then decode one at a time
        steps = [np.asarray(llm.engine.decode(t), np.float64).copy() for t in ids[7:]]
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    assert np.abs(np.stack(steps) - want[7:]).max() < 1e-3


def test_unsupported_rope_scaling_refused(fixtures, tmp_path, smollm2_path):
    from gguf_fixtures import write_tiny
    p = tmp_path / "longrope.gguf"
    write_tiny(p, smollm2_path, md_override={"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0})
    import infer
    with pytest.raises(infer.UnsupportedError, match=r"longrope.gguf: rope scaling type 'longrope' is not supported"):
        infer.LLM(str(p), n_ctx=32)
