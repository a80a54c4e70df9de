"""The real Gemma 3 270M Q4_K_M against transformers fp32 on the weights it dequantizes from the
same GGUF (tests/golden/make_gemma3_goldens.py made gemma3_270m_ref.npz: top-64 logits and the
full-vocabulary log-sum-exp at each of 257 positions of GPL-3, token ids from llama.cpp's
tokenizer). KL is the project's `--kl` measure: transformers' top 32 tokens plus one bucket for
the rest. llama.cpp on the same ids, one thread: mean 0.0055 (in the golden's meta)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import infer
from conftest import GOLDEN, gemma3_file

REF = GOLDEN / "gemma3_270m_ref.npz"
N = 256         # rows with a target


def _lse(x):
    m = x.max(1, keepdims=True)
    return m[:, 0] + np.log(np.exp(x - m).sum(1))


def kl_top32(ref_ids, ref_logits, ref_lse, ours):
    """KL(transformers || ours) per row over transformers' top 32 plus the rest."""
    tp = ref_logits[:, :32] - ref_lse[:, None]
    tq = np.take_along_axis(ours - _lse(ours)[:, None], ref_ids[:, :32], 1)
    kl = (np.exp(tp) * (tp - tq)).sum(1)
    rp = np.log1p(-np.minimum(np.exp(tp).sum(1), 1 - 1e-12))
    rq = np.log1p(-np.minimum(np.exp(tq).sum(1), 1 - 1e-12))
    return kl + np.exp(rp) * (rp - rq)


@pytest.fixture(scope="module")
def ref():
    with np.load(REF, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def path(ref):
    p = gemma3_file()
    meta = json.loads(str(ref["meta"]))
    if p.stat().st_size != meta["gguf_size"]:
        pytest.fail(f"{p} is not the file the golden was made from ({meta['gguf_size']} bytes)")
    return p


def _run(path, ref, **kw):
    with infer.LLM(path, n_ctx=512, **kw) as llm:
        lg = llm.logits(ref["ids"].tolist())
    assert lg.shape == (257, 262144)
    kl = kl_top32(ref["tf_top64_ids"][:N], ref["tf_top64_logits"][:N], ref["tf_logsumexp"][:N], lg[:N])
    top1 = float((lg[:N].argmax(1) == ref["tf_top64_ids"][:N, 0]).mean())
    diff = float(np.abs(np.take_along_axis(lg, ref["tf_top64_ids"], 1) - ref["tf_top64_logits"]).max())
    return float(kl.mean()), top1, diff


@pytest.mark.parametrize("n_threads", [1, 2])
def test_exact_path_matches_transformers(path, ref, n_threads):
    kl, top1, diff = _run(path, ref, n_threads=n_threads, int8_activations=False)
    assert kl <= 1e-4 and top1 == 1.0 and diff <= 2e-3, (kl, top1, diff)   # measured: 3e-9, 1.0, 1.1e-4


@pytest.mark.parametrize("n_threads", [1, 2, None])
def test_default_path_within_issue_bound(path, ref, n_threads):
    """Default arguments (int8 prefill on a VNNI CPU at any thread count, on two threads elsewhere):
    top-32 KL <= 0.002, under half of llama.cpp's 0.0055 on the same ids. Measured 0.00083 with the
    256-value formats' activations at a step per 16 values (blockir.quantize_rows_k); llama.cpp's
    Q8_K form (a step per 256) gave 0.0041: the FFN down projection's heavy-tailed input."""
    kl, top1, diff = _run(path, ref, n_threads=n_threads)
    assert kl <= 0.002 and top1 >= 0.97, (kl, top1, diff)
