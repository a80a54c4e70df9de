"""Every way a prompt can run gives the float path's answer: threads 1, 2 and the default
(n_threads=None), int8 and float activations, one chunk and chunked prompts with ragged tails,
prompt lengths 1..100 and a few past 256 and past 512, the real model in every natively run type.

The prompt's last logits (they pick the first generated token) of each length are compared with
the float path's over the same tokens, all positions of one float prefill (causal: position n - 1
of the long prompt is the last position of the prompt of n tokens). Issue 13: on an AVX-512 host
two threads answered the chat test with "L'Étoile, ..."; the cause was not the threads but int8
activations with one scale per block of 32 (SmolLM2's outlier channels), which the two-thread
route used for prompts of over 32 tokens while one thread ran them through float BLAS. With one
scale per 4 values and the last token's residual row (blockir.quantize_rows) the int8 path agrees
with the float path at every length here; before, 8 of 100 lengths had another top token.
"""
from __future__ import annotations

import numpy as np
import pytest

from infer.kernels import blockir, simd

from conftest import smollm2_file
from typed_models import MIXED, requantize

TEXT = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
LENGTHS = list(range(1, 101)) + [257, 300, 600]
N_CTX = 1024

# one thread: a small model's long prompts run on BLAS tiles where the CPU has no token-lane kernel
# (llama.Scratch: faster there), int8 where it has (VNNI)
T1_BLAS = set() if blockir.TOKEN_LANES else {"blas"}
# name -> LLM keyword arguments; what each must exercise (LlamaModel.routes)
CONFIGS = {
    "default": ({}, set()),         # n_threads=None: this machine's cores (see test_default_threads)
    "t1": ({"n_threads": 1}, {"int8", "attend_rows", "attn_tasks"} | T1_BLAS),
    "t2": ({"n_threads": 2}, {"int8", "attend_rows", "attn_tasks_threads", "attn_tasks"}),
    "t1-chunks": ({"n_threads": 1, "n_batch": 61}, {"int8", "attend_rows", "attn_tasks"} | T1_BLAS),
    "t2-chunks": ({"n_threads": 2, "n_batch": 61}, {"int8", "attend_rows", "attn_tasks"}),
    "float-t2": ({"n_threads": 2, "int8_activations": False}, {"blas", "matvec", "attn_tasks"}),
}


@pytest.fixture(scope="module")
def ids():
    import infer
    tok = infer.Tokenizer.from_gguf(smollm2_file())
    out = tok.encode(TEXT[:8000], add_bos=True)
    assert len(out) >= max(LENGTHS)
    return out[:max(LENGTHS)]


def float_logits(path, ids):
    """All positions' logits of the float path (one thread: BLAS tiles, attention tasks)."""
    import infer
    with infer.LLM(path, n_ctx=N_CTX, n_threads=1, int8_activations=False) as f:
        return f.engine.prefill(ids, all_logits=True, reuse=False).copy()


@pytest.fixture(scope="module")
def ref(ids):
    return float_logits(smollm2_file(), ids)


def last_logits(llm, ids, lengths):
    """(len(lengths), n_vocab): the last logits of each prompt ids[:n], run from an empty cache."""
    return np.stack([llm.engine.prefill(ids[:n], reuse=False).copy() for n in lengths])


def check(got, want, lengths, int8):
    err = np.abs(got - want)
    top = got.argmax(1) == want.argmax(1)
    bad = [(n, round(float(err[i].max()), 2)) for i, n in enumerate(lengths) if not top[i]]
    if int8:
        # the bounds of test_int8_decode's long prompt (max 3, mean 0.3); measured here after the
        # fix: top token 100 % (before: 92 %), max 1.34, mean 0.09 (2 threads; one thread 0.68, 0.02)
        assert top.mean() >= 0.97, bad
        assert err.max() < 3.0 and err.mean() < 0.3, (err.max(), err.mean())
    else:
        assert top.all(), bad
        assert err.max() < 2e-3, err.max()
    return top.mean(), err.max(), err.mean()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_routes_match_float(name, ids, ref):
    import infer
    kw, routes = CONFIGS[name]
    with infer.LLM(smollm2_file(), n_ctx=N_CTX, **kw) as llm:
        llm.model.routes.clear()
        got = last_logits(llm, ids, LENGTHS)
        taken = set(llm.model.routes)
        int8 = llm.engine.scratch.use_i8
    assert int8 == (kw.get("int8_activations", True) and simd.HAVE_AVX2)
    want = ref[np.array(LENGTHS) - 1]
    check(got, want, LENGTHS, int8)
    if simd.HAVE_AVX2 or "int8" not in routes:
        assert routes <= taken, (routes, taken)


def test_default_threads():
    """n_threads=None is the physical cores of this process's CPUs; the default config above ran
    the matching explicit config's routes."""
    import infer
    from infer.api import default_threads
    with infer.LLM(smollm2_file(), n_ctx=64) as llm:
        assert llm.n_threads == default_threads() >= 1
        assert llm.engine.scratch.use_i8 == simd.HAVE_AVX2


TYPED_LENGTHS = list(range(1, 41)) + [100, 300]


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    """name -> path: SmolLM2 in Q8_0, Q4_0, F16, and one layer per type (Q8_0, Q4_0, Q4_1, F16, BF16,
    F32 in turn; typed_models.MIXED). About 30 s on two cores, once per session."""
    d = tmp_path_factory.mktemp("typed")
    out = {}
    for name, type_of in (("q8_0", lambda n, s: "Q8_0"), ("q4_0", lambda n, s: "Q4_0"),
                          ("f16", lambda n, s: "F16"), ("mixed", MIXED)):
        out[name] = d / f"smollm2-{name}.gguf"
        requantize(smollm2_file(), out[name], type_of)
    return out


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "f16", "mixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_types_match_float(typed, ids, name, threads):
    import infer
    path = typed[name]
    want = float_logits(path, ids[:max(TYPED_LENGTHS)])[np.array(TYPED_LENGTHS) - 1]
    with infer.LLM(path, n_ctx=N_CTX, n_threads=threads) as llm:
        types = {t.qtype.name for t in llm._gf.tensors.values()}
        assert types == ({"F32", "Q8_0", "Q4_0", "Q4_1", "F16", "BF16"} if name == "mixed" else
                         {"F32", name.upper()}), types
        got = last_logits(llm, ids, TYPED_LENGTHS)
        int8 = llm.engine.scratch.use_i8 and name != "f16"
        if int8 and name != "mixed":
            assert "int8" in llm.model.routes
    check(got, want, TYPED_LENGTHS, int8)


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_chat_answers_with_default_arguments(threads):
    """The report: chat with the default constructor arguments (int8 activations) on 2 threads
    answered "L'Étoile, la Marseillaise, ..." (llama.cpp too, on this file: the float top two
    tokens are 0.09 apart); float activations and one thread said Paris."""
    import infer
    kw = {} if threads is None else {"n_threads": threads}
    with infer.LLM(smollm2_file(), **kw) as llm:
        r = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
                     sampling=infer.SamplingParams.greedy())
    assert r.text.startswith("The capital of France is Paris"), r.text


@pytest.mark.parametrize("n", [13, 16])
def test_residual_row_gives_float_precision(n):
    """_matmul_i8 with the residual row: the last row is the float product to ~1e-5 (int8 error
    squared), the other rows keep int8 noise (~1e-3 here, with outlier channels). n = 16: the
    residual row would take a token group of its own, so the last row comes from the float matvec."""
    import infer
    with infer.LLM(smollm2_file(), n_ctx=64, n_threads=2) as llm:
        if not llm.engine.scratch.use_i8:
            pytest.skip("int8 activations need AVX2")
        m, s = llm.model, llm.engine.scratch
        rng = np.random.default_rng(5)
        cols = llm.config.dim
        h = rng.standard_normal((n, cols)).astype(np.float32)
        h[:, 7::32] *= 40.0                      # an outlier channel in every block
        tab = m.tab_gu[0]
        rows = int(tab[:, 2].sum())
        want = np.zeros((n, rows), np.float32)
        m._matmuls(s, tab, h, np.zeros((n + 1, rows), np.float32))       # warm
        s.resid = 0
        for j, t in enumerate(tab):             # float reference: the float BLAS route
            c0 = int(tab[:j, 2].sum())
            m._matmul(s, t, h, want[:, c0:c0 + int(t[2])], allow_i8=False)
        out = {}
        for r in (0, 1):
            s.resid = r
            o = np.zeros((n + 1, rows), np.float32)
            m.routes.clear()
            m._matmuls(s, tab, h, o)
            out[r] = o[:n]
            assert m.routes["int8"] == 1, m.routes           # one int8 matmul of the group
        s.resid = 0
    scale = np.abs(want).max()
    e0, e1 = (np.abs(out[r] - want) / scale for r in (0, 1))
    assert e1[-1].max() < 2e-5, e1[-1].max()
    assert e0[-1].max() > 20 * e1[-1].max()
    np.testing.assert_array_equal(out[0][:-1], out[1][:-1])   # the other rows as before
