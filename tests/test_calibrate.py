"""Calibrated quantization: importance-weighted Q4_0/Q4_1 blocks, importance matrices (infer.calibrate
and their files), convert(imatrix=...) / --imatrix / --calibrate, `infer calibrate`, and the KL
divergence of `infer.perplexity` checked against a full-vocabulary computation on two real (tiny)
models."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

import convert_fixtures as cf
import infer
from infer.errors import InferError
from infer.perplexity import _log_softmax
from infer.quant import codecs, types
from infer.quant.imatrix import ImatrixError, ImportanceMatrix
from infer.quant.quantize import quantize_rows
from infer.quant.weighted import q4_0_scales_kernel, quantize_rows_weighted

QTS = [(types.Q4_0, G.Q4_0), (types.Q4_1, G.Q4_1)]


def data(rows=64, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= rng.uniform(0.01, 2, (rows, 1)).astype(np.float32)
    x[:, rng.integers(0, cols, 4)] *= 6                           # a few outlier columns
    imp = np.exp(rng.normal(0, 1.5, cols))                        # very non-uniform importance
    return x, imp


def block_err(x, dq, imp):
    """Importance-weighted squared error per block of 32: (rows, cols // 32)."""
    e = (dq - x) ** 2 * imp
    return e.reshape(x.shape[0], -1, 32).sum(-1)


# --- the quantizers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qt,g", QTS)
def test_weighted_beats_round_to_max(qt, g):
    x, imp = data()
    ours = gguf.quants.dequantize(quantize_rows_weighted(x, qt, imp), g).reshape(x.shape)
    ref = gguf.quants.dequantize(quantize_rows(x, qt), g).reshape(x.shape)
    e_ours, e_ref = block_err(x, ours, imp), block_err(x, ref, imp)
    assert e_ours.sum() < 0.8 * e_ref.sum()
    # block by block never worse than round-to-max, up to the float16 rounding of the scales
    assert np.all(e_ours <= e_ref * 1.01 + 1e-12)
    # with uniform importance: plain squared error, still lower
    uni = gguf.quants.dequantize(quantize_rows_weighted(x, qt, np.ones(x.shape[1])), g).reshape(x.shape)
    assert ((uni - x) ** 2).sum() < 0.97 * ((ref - x) ** 2).sum()


@pytest.mark.parametrize("qt,g", QTS)
def test_blocks_are_standard(qt, g):
    """gguf's reference dequantizer reads them; our codec agrees; special blocks stay finite."""
    x, imp = data(rows=16, cols=128, seed=1)
    x[0] = 0.0                                                   # all-zero row
    x[1, :32] = -3.0                                             # constant block
    x[2, :32] = 1e-6 * np.arange(32)                             # tiny values
    imp[32:64] = 0.0                                             # a block nobody looks at
    b = quantize_rows_weighted(x, qt, imp)
    assert b.shape == (16, qt.row_bytes(128)) and b.dtype == np.uint8
    ref = gguf.quants.dequantize(b, g).reshape(x.shape)
    ours = codecs.dequantize(b, qt).reshape(x.shape)
    np.testing.assert_array_equal(ref, ours)
    assert np.isfinite(ref).all() and (ref[0] == 0).all()
    assert np.abs(ref[1, :32] + 3).max() < 1e-3
    assert np.abs(ref - x).max() < 0.3 * np.abs(x).max()


def test_q4_0_scale_is_the_exact_weighted_optimum():
    """The sweep finds the best scale: no scale on a fine grid does better (before float16 rounding)."""
    x, imp = data(rows=4, cols=320, seed=2)
    c = np.maximum(imp, 1e-6 * imp.mean())
    d = np.empty((4, 10), np.float32)
    q4_0_scales_kernel(x, c, d)
    for r in range(4):
        for b in range(10):
            xb, cb = x[r, b * 32:(b + 1) * 32].astype(np.float64), c[b * 32:(b + 1) * 32]

            def err(dd):
                q = np.clip(np.round(xb / dd), -8, 7)
                # with the best scale for these integers
                s = (cb * xb * q).sum() / (cb * q * q).sum()
                return (cb * (xb - s * q) ** 2).sum()
            amax = np.abs(xb).max()
            grid = np.concatenate([amax / np.linspace(2.6, 24, 3000), -amax / np.linspace(2.6, 24, 3000)])
            best = min(err(g) for g in grid)
            q = np.clip(np.round(xb / d[r, b]), -8, 7)
            ours = (cb * (xb - d[r, b] * q) ** 2).sum()
            assert ours <= best * (1 + 1e-5) + 1e-12


def test_importance_validation():
    x, imp = data(rows=2, cols=64)
    with pytest.raises(ValueError, match="importance has 32 values"):
        quantize_rows_weighted(x, types.Q4_0, imp[:32])
    with pytest.raises(ValueError, match="finite"):
        quantize_rows_weighted(x, types.Q4_0, np.full(64, np.nan))
    with pytest.raises(NotImplementedError):
        quantize_rows_weighted(x, types.Q8_0, imp)


# --- importance matrix files --------------------------------------------------------------------------
IDENT = {"arch": "llama", "n_layers": 2, "n_embd": 64, "n_ff": 96, "n_heads": 4, "n_kv_heads": 2, "n_vocab": 400}


def test_imatrix_roundtrip_and_errors(tmp_path):
    im = ImportanceMatrix(model=dict(IDENT, name="tiny"), source={"text": "t.txt", "n_chunks": 2})
    rng = np.random.default_rng(0)
    h1, h2 = rng.standard_normal((5, 64)), rng.standard_normal((3, 64))
    im.add("blk.0.attn_q.weight", h1)
    im.add("blk.0.attn_q.weight", h2)
    im.add("blk.0.ffn_down.weight", rng.standard_normal((8, 96)))
    np.testing.assert_allclose(im.importance("blk.0.attn_q.weight"), (np.concatenate([h1, h2]) ** 2).mean(0))
    f = im.save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == ["s.npz"]
    back = ImportanceMatrix.load(f)
    assert back.model == im.model and back.source == im.source and back.counts == im.counts
    for n in im.sums:
        np.testing.assert_array_equal(back.sums[n], im.sums[n])
    with np.load(f, allow_pickle=False) as z:                   # readable without pickle
        assert str(z["format"]) == "infer-imatrix-1"
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.0.ffn_down.weight": (64, 96), "token_embd.weight": (400, 64)}
    back.check_model(IDENT, shapes, "x")                        # token_embd may be missing (lookup table)
    with pytest.raises(ImatrixError, match="computed on another model .*30 layers"):
        back.check_model(dict(IDENT, n_layers=30), shapes, "x")
    with pytest.raises(ImatrixError, match="no entry for blk.1.attn_q.weight"):
        back.check_model(IDENT, dict(shapes, **{"blk.1.attn_q.weight": (64, 64)}), "x")
    with pytest.raises(ImatrixError, match="64 channels for blk.0.attn_q.weight, which has rows of 32"):
        ImportanceMatrix.load(f).check_model(IDENT, {"blk.0.attn_q.weight": (64, 32)}, "x")
    with pytest.raises(ImatrixError, match="not found"):
        ImportanceMatrix.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ImatrixError, match="not an importance matrix file"):
        ImportanceMatrix.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ImatrixError, match="not an infer importance matrix"):
        ImportanceMatrix.load(tmp_path / "other.npz")
    assert issubclass(ImatrixError, InferError)


# --- calibration on tiny real models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    out = {}
    for name in ("llama_bpe", "qwen2"):
        src = cf.MAKERS[name](root / name)
        f16 = root / f"{name}-f16.gguf"
        infer.convert(src, f16, type="f16")
        text = root / f"{name}.txt"
        text.write_text(cf.TEXT * 3)
        out[name] = (src, f16, text)
    return out


def test_calibrate_statistics_match_reference(tiny):
    """Layer 0's q/k/v input is rmsnorm(embedding): its sums of squares computed here from the
    safetensors weights, per chunk (first token BOS when the vocabulary adds one)."""
    src, f16, text = tiny["llama_bpe"]
    im = infer.calibrate(f16, text, n_ctx=32)
    with infer.LLM(f16, n_ctx=32) as llm:
        toks = llm.tokenizer.encode(text.read_text()[:-1], add_bos=None)
        bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    w = cf.load_weights(src)
    chunks = [toks[i:i + 32] for i in range(0, len(toks), 32)]
    chunks = [c for c in chunks if len(c) >= 16]
    ids = []
    for c in chunks:
        ids += [bos] + list(c[1:]) if bos is not None else list(c)
    x = w["model.embed_tokens.weight"][ids]
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w["model.layers.0.input_layernorm.weight"]
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(im.sums[name], (h * h).sum(0), rtol=2e-4)
        assert im.counts[name] == len(ids)
    assert len(im) == 7 * 2 + 1 and "output.weight" in im and "token_embd.weight" not in im
    assert im.source["n_tokens"] == len(ids) and im.source["n_chunks"] == len(chunks)
    assert im.model["arch"] == "llama" and im.model["n_layers"] == 2 and im.model["weights"] == "F16"
    # a tied model's output matmul is recorded under the tensor it uses
    im2 = infer.calibrate(tiny["qwen2"][1], tiny["qwen2"][2], n_ctx=32, n_chunks=2)
    assert "token_embd.weight" in im2 and "output.weight" not in im2 and im2.source["n_chunks"] == 2


def test_convert_with_imatrix(tiny, tmp_path):
    src, f16, text = tiny["llama_bpe"]
    im = infer.calibrate(f16, text, n_ctx=32)
    plain, cal = tmp_path / "plain.gguf", tmp_path / "cal.gguf"
    infer.convert(src, plain, type="q4_0_mixed")
    infer.convert(src, cal, type="q4_0_mixed", imatrix=im)
    rp, rc = gguf.GGUFReader(plain), gguf.GGUFReader(cal)
    assert rc.fields["quantize.imatrix.entries_count"].contents() == 15
    assert rc.fields["quantize.imatrix.dataset"].contents() == text.name
    w = cf.load_weights(src)
    n_diff = 0
    for tp, tc in zip(rp.tensors, rc.tensors):
        assert (tp.name, tp.tensor_type) == (tc.name, tc.tensor_type)
        if tc.tensor_type == G.Q4_0 and tc.name != "token_embd.weight":
            n_diff += not np.array_equal(tp.data, tc.data)
            imp = im.importance(tc.name)
            orig = gguf.quants.dequantize(np.asarray(tp.data), G.Q4_0).astype(np.float64)
            hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}[tc.name.split(".")[2]]
            x = w[f"model.layers.{tc.name.split('.')[1]}.{hf}.weight"]
            if hf in ("self_attn.q_proj", "self_attn.k_proj"):
                continue                                      # rows permuted by the converter
            ec = (((gguf.quants.dequantize(np.asarray(tc.data), G.Q4_0) - x) ** 2) * imp).sum()
            ep = (((orig - x) ** 2) * imp).sum()
            assert ec < ep, tc.name
        else:
            np.testing.assert_array_equal(tp.data, tc.data)  # q8_0 / f32 / token_embd: as without imatrix
    assert n_diff > 0
    with infer.LLM(cal, n_ctx=64) as llm:                      # loads and runs
        assert np.isfinite(llm.logits(llm.tokenize("The quick brown fox"))).all()


def test_convert_imatrix_errors(tiny, tmp_path):
    src, f16, text = tiny["llama_bpe"]
    other = infer.calibrate(tiny["qwen2"][1], tiny["qwen2"][2], n_ctx=32, n_chunks=1)
    out = tmp_path / "o.gguf"
    with pytest.raises(ImatrixError, match="computed on another model"):
        infer.convert(src, out, type="q4_0", imatrix=other)
    with pytest.raises(ImatrixError, match="not found"):
        infer.convert(src, out, type="q4_1", imatrix=tmp_path / "missing.npz")
    with pytest.raises(InferError, match="only applies to q4_0, q4_1"):
        infer.convert(src, out, type="q8_0", imatrix=other)
    assert os.listdir(tmp_path) == []


# --- KL divergence against a direct full-vocabulary computation on real models --------------------------
def test_kl_matches_full_vocabulary_on_real_models(tiny, tmp_path):
    src, f16, text = tiny["llama_bpe"]
    q = tmp_path / "q4_0.gguf"
    infer.convert(src, q, type="q4_0")
    n_ctx = 32
    base = tmp_path / "base.npz"
    with infer.LLM(f16, n_ctx=n_ctx) as a, infer.LLM(q, n_ctx=n_ctx) as b:
        n_vocab = a.tokenizer.n_vocab
        infer.perplexity(a, text, n_ctx=n_ctx, kl_base=base, kl_top_k=n_vocab)        # whole vocabulary
        r = infer.perplexity(b, text, n_ctx=n_ctx, kl=base).kl
        base32 = tmp_path / "base32.npz"
        infer.perplexity(a, text, n_ctx=n_ctx, kl_base=base32)                        # top-32 + rest
        r32 = infer.perplexity(b, text, n_ctx=n_ctx, kl=base32).kl
        toks = a.tokenizer.encode(text.read_text()[:-1], add_bos=None)
        bos = a.tokenizer.bos_id if a.tokenizer.add_bos else None
        kld, same = [], []
        for c in range(len(toks) // n_ctx):
            ch = list(toks[c * n_ctx:(c + 1) * n_ctx])
            if bos is not None:
                ch[0] = bos
            lp = _log_softmax(a.logits(ch[:-1]))[n_ctx // 2:]
            lq = _log_softmax(b.logits(ch[:-1]))[n_ctx // 2:]
            kld += list((np.exp(lp) * (lp - lq)).sum(1))
            same += list(lp.argmax(1) == lq.argmax(1))
    kld = np.array(kld)
    assert r.n_tokens == len(kld) and kld.mean() > 1e-4
    np.testing.assert_allclose(r.kld, kld, rtol=1e-3, atol=1e-7)
    assert r.same_top_pct == pytest.approx(100 * np.mean(same))
    # top-32 + rest is a lower bound (loose here: a random tiny model spreads its mass over the vocabulary)
    assert np.all(r32.kld <= kld + 1e-6) and r32.mean_kld > 0


# --- the command line ------------------------------------------------------------------------------------
def cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "infer.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def one_error_line(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_calibrate_then_convert(tiny, tmp_path):
    src, f16, text = tiny["llama_bpe"]
    stats = tmp_path / "stats.npz"
    r = cli("calibrate", f16, "-f", text, "-o", stats, "-c", "32", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "15 tensors" in r.stdout and stats.exists()
    one_error_line(cli("calibrate", f16, "-f", text, "-o", stats, "-c", "32"), "already exists")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    r = cli("convert", src, "-o", a, "--type", "q4_1", "--imatrix", stats)
    assert r.returncode == 0, r.stderr
    assert "importance matrix" in r.stdout
    r = cli("convert", src, "-o", b, "--type", "q4_1", "--calibrate", text, "--calib-ctx", "32", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "calibrated on" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf", "stats.npz"]      # no temporary file left
    ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors             # the same statistics
    for x, y in zip(ta, tb):
        np.testing.assert_array_equal(x.data, y.data)


def test_cli_errors(tiny, tmp_path):
    src, f16, text = tiny["llama_bpe"]
    out = tmp_path / "out"
    out.mkdir()
    o = out / "m.gguf"
    one_error_line(cli("convert", src, "-o", o, "--type", "q4_0", "--imatrix", tmp_path / "missing.npz"),
                   "missing.npz", "not found")
    (tmp_path / "junk.npz").write_text("junk")
    one_error_line(cli("convert", src, "-o", o, "--type", "q4_0", "--imatrix", tmp_path / "junk.npz"),
                   "not an importance matrix file")
    other = tmp_path / "other.npz"
    infer.calibrate(tiny["qwen2"][1], tiny["qwen2"][2], n_ctx=32, n_chunks=1).save(other)
    one_error_line(cli("convert", src, "-o", o, "--type", "q4_0", "--imatrix", other), "computed on another model")
    stats = tmp_path / "stats.npz"
    infer.calibrate(f16, text, n_ctx=32, n_chunks=1).save(stats)
    one_error_line(cli("convert", src, "-o", o, "--type", "q8_0", "--imatrix", stats), "only applies to q4_0")
    one_error_line(cli("convert", src, "-o", o, "--type", "q4_0", "--imatrix", stats, "--calibrate", text),
                   "at most one")
    one_error_line(cli("convert", src, "-o", o, "--type", "q4_0", "--calibrate", tmp_path / "none.txt"),
                   "none.txt", "not found")
    one_error_line(cli("convert", src, "-o", o, "--type", "f16", "--calibrate", text), "only applies to q4_0")
    one_error_line(cli("calibrate", f16, "-f", tmp_path / "none.txt", "-o", tmp_path / "s2.npz"), "not found")
    one_error_line(cli("calibrate", tmp_path / "none.gguf", "-f", text, "-o", tmp_path / "s2.npz"), "none.gguf")
    one_error_line(cli("calibrate", f16, "-f", text, "-o", tmp_path / "no" / "s.npz"), "does not exist")
    assert os.listdir(out) == [] and not (tmp_path / "s2.npz").exists()
