"""`infer perplexity` / infer.perplexity: llama-perplexity's method, checked against golden figures
from transformers fp32 (tests/golden/smollm2_ppl.json), and the KL-divergence files checked against a
direct full-vocabulary computation on a fake model (fast, exact)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer
from conftest import GOLDEN
from infer.errors import ContextError, InferError
from infer.perplexity import _log_softmax, ppl_stats, read_text

GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def golden():
    g = json.loads((GOLDEN / "smollm2_ppl.json").read_text())
    if not GPL3.exists() or hashlib.sha256(GPL3.read_bytes()).hexdigest() != g["text_sha256"]:
        pytest.skip(f"{GPL3} is absent or not the text the golden figures were computed on")
    return g


# --- SmolLM2 against transformers fp32 --------------------------------------------------------------
def test_tokens_equal_golden(smollm2, golden):
    text = read_text(GPL3)                               # -f drops one trailing newline
    assert text == GPL3.read_text()[:-1]
    assert not smollm2.tokenizer.add_bos
    assert smollm2.tokenizer.encode(text, add_bos=None) == golden["token_ids"]


def test_three_chunks_match_golden(smollm2, golden):
    seen = []
    r = infer.perplexity(smollm2, GPL3, n_ctx=512, n_chunks=3, progress=lambda *a: seen.append(a))
    ref = np.array(golden["transformers_fp32"]["chunk_nll_sums"][:3])
    assert (r.n_ctx, r.n_chunks, r.n_tokens, r.n_tokens_scored) == (512, 3, golden["n_tokens"], 3 * 255)
    np.testing.assert_allclose(r.chunk_nll, ref, rtol=0.005)
    assert r.ppl == pytest.approx(math.exp(ref.sum() / 765), rel=0.005)
    assert r.token_nll.shape == (765,) and r.chunk_nll.sum() == pytest.approx(r.token_nll.sum())
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose([s[2] for s in seen], r.chunk_ppl)
    assert seen[-1][2] == pytest.approx(r.ppl)
    assert 0 < r.ppl_stderr < r.ppl and r.tokens_per_s > 0


def test_full_text_matches_golden(smollm2, golden):
    """The whole GPL-3 (14 chunks of 512): 26 s on 2 idle cores, up to ~110 s on a loaded machine."""
    r = infer.perplexity(smollm2, GPL3, n_ctx=512)
    g = golden["transformers_fp32"]
    assert (r.n_chunks, r.n_tokens_scored) == (golden["n_chunks"], golden["scored_tokens"])
    assert r.ppl == pytest.approx(g["ppl"], rel=0.005)
    np.testing.assert_allclose(r.chunk_nll, g["chunk_nll_sums"], rtol=0.005)
    # the standard error as llama-perplexity computes it, from the same per-token NLLs
    nll = r.token_nll
    assert r.ppl_stderr == pytest.approx(r.ppl * math.sqrt((np.mean(nll ** 2) - np.mean(nll) ** 2)
                                                          / (len(nll) - 1)))


# --- a fake model: exact expectations for the method and the KL files -----------------------------
class FakeTokenizer:
    def __init__(self, n_vocab, add_bos):
        self.n_vocab, self.add_bos, self.bos_id = n_vocab, add_bos, 1

    def encode(self, text, add_bos=None):
        add_bos = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] if add_bos else []) + [2 + ord(c) % (self.n_vocab - 2) for c in text]


class FakeLLM:
    """logits[i] = table[ids[i]] + position term: a deterministic function of the ids run."""

    def __init__(self, n_vocab=64, n_ctx=16, add_bos=False, noise=0.0, seed=0):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(0, 3, (n_vocab, n_vocab)).astype(np.float32)
        if noise:
            self.table += np.random.default_rng(99).normal(0, noise, self.table.shape).astype(np.float32)
        self.pos = rng.normal(0, 1, (64, n_vocab)).astype(np.float32)
        self.tokenizer = FakeTokenizer(n_vocab, add_bos)
        self.n_ctx, self.path, self.calls = n_ctx, "fake.gguf", []

    def logits(self, ids):
        self.calls.append(list(ids))
        ids = np.asarray(ids)
        return self.table[ids] + self.pos[np.arange(len(ids))]


TEXT = "".join(chr(97 + (i * 7919) % 26) for i in range(200))       # 200 tokens


def expected_nll(llm, tokens, n_ctx, n_chunks, bos=None):
    first = n_ctx // 2
    out = []
    for c in range(n_chunks):
        ch = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            ch[0] = bos
        lp = _log_softmax(llm.table[ch] + llm.pos[:n_ctx])
        out += [-lp[i, ch[i + 1]] for i in range(first, n_ctx - 1)]
    return np.array(out)


@pytest.mark.parametrize("add_bos", [False, True])
def test_method_on_fake_model(add_bos):
    llm = FakeLLM(n_ctx=16, add_bos=add_bos)
    toks = llm.tokenizer.encode(TEXT)
    r = infer.perplexity(llm, TEXT, n_ctx=16)
    n_chunks = len(toks) // 16
    assert r.n_chunks == n_chunks and r.n_tokens == len(toks) and r.n_tokens_scored == n_chunks * 7
    assert len(llm.calls) == n_chunks
    for c, call in enumerate(llm.calls):                       # n_ctx - 1 tokens, BOS only if add_bos
        assert call[1:] == toks[c * 16 + 1:(c + 1) * 16 - 1]
        assert call[0] == (1 if add_bos else toks[c * 16])
    want = expected_nll(llm, toks, 16, n_chunks, bos=1 if add_bos else None)
    np.testing.assert_allclose(r.token_nll, want, rtol=1e-12)
    ppl, err = ppl_stats(want)
    assert r.ppl == pytest.approx(ppl) and r.ppl_stderr == pytest.approx(err)
    r2 = infer.perplexity(llm, TEXT, n_ctx=16, n_chunks=3)
    np.testing.assert_allclose(r2.token_nll, want[:21])


def test_llm_context_too_small():
    with pytest.raises(ContextError, match="n_ctx 16"):
        infer.perplexity(FakeLLM(n_ctx=16), TEXT, n_ctx=32)


def test_file_text_drops_one_newline(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT + "\n\n")
    assert read_text(f) == TEXT + "\n"
    llm = FakeLLM()
    r = infer.perplexity(llm, f, n_ctx=16)
    assert r.n_tokens == len(TEXT) + 1


def full_kld(p_llm, q_llm, tokens, n_ctx, n_chunks):
    first, kld, same, dp = n_ctx // 2, [], [], []
    for c in range(n_chunks):
        ch = tokens[c * n_ctx:(c + 1) * n_ctx]
        lp = _log_softmax(p_llm.table[ch] + p_llm.pos[:n_ctx])[first:n_ctx - 1]
        lq = _log_softmax(q_llm.table[ch] + q_llm.pos[:n_ctx])[first:n_ctx - 1]
        kld += list((np.exp(lp) * (lp - lq)).sum(1))
        same += list(lp.argmax(1) == lq.argmax(1))
        tg = np.array(ch[first + 1:])
        dp += list(np.exp(lq[np.arange(len(tg)), tg]) - np.exp(lp[np.arange(len(tg)), tg]))
    return np.array(kld), np.array(same), np.array(dp)


@pytest.mark.parametrize("top_k", [64, 8])
def test_kl_against_full_vocabulary(tmp_path, top_k):
    base, quant = FakeLLM(n_vocab=64), FakeLLM(n_vocab=64, noise=0.3)
    f = tmp_path / "base.npz"
    rb = infer.perplexity(base, TEXT, n_ctx=16, kl_base=f, kl_top_k=top_k)
    assert rb.kl is None and f.exists() and os.listdir(tmp_path) == ["base.npz"]   # no temp file left
    with np.load(f, allow_pickle=False) as z:
        assert z["topk_ids"].shape == (rb.n_tokens_scored, top_k) and z["topk_ids"].dtype == np.int32
    r = infer.perplexity(quant, TEXT, n_ctx=16, kl=f)
    k = r.kl
    kld, same, dp = full_kld(base, quant, base.tokenizer.encode(TEXT), 16, r.n_chunks)
    assert k.n_tokens == r.n_tokens_scored == len(kld)
    if top_k == 64:                                       # the whole vocabulary stored: exact
        np.testing.assert_allclose(k.kld, kld, rtol=1e-4, atol=1e-6)
    else:                                                 # top-k + rest: a lower bound, close to it
        assert np.all(k.kld <= kld + 1e-6) and k.mean_kld > 0.7 * kld.mean()
    assert k.mean_kld == pytest.approx(k.kld.mean()) and k.kld_percentiles["max"] == pytest.approx(k.kld.max())
    assert k.same_top_pct == pytest.approx(100 * same.mean())
    assert k.mean_dp == pytest.approx(dp.mean(), abs=1e-6)
    assert k.rms_dp == pytest.approx(math.sqrt((dp ** 2).mean()), rel=1e-5)
    assert k.ppl == pytest.approx(r.ppl) and k.ppl_base == pytest.approx(rb.ppl, rel=1e-6)
    assert k.ppl_ratio == pytest.approx(r.ppl / rb.ppl, rel=1e-6)
    # the same model against its own base: nothing lost
    s = infer.perplexity(base, TEXT, n_ctx=16, kl=f).kl
    assert abs(s.mean_kld) < 1e-6 and s.same_top_pct == 100 and s.ppl_ratio == pytest.approx(1, abs=1e-6)


def test_kl_file_errors(tmp_path):
    llm = FakeLLM()
    f = tmp_path / "base.npz"
    infer.perplexity(llm, TEXT, n_ctx=16, kl_base=f)
    with pytest.raises(InferError, match="n_ctx 16, not 32.*-c 16"):
        infer.perplexity(FakeLLM(n_ctx=32), TEXT + TEXT, n_ctx=32, kl=f)
    with pytest.raises(InferError, match="other tokens"):
        infer.perplexity(llm, TEXT[::-1], n_ctx=16, kl=f)
    with pytest.raises(InferError, match="holds 12 chunks, fewer than the 13"):
        infer.perplexity(llm, TEXT + TEXT, n_ctx=16, n_chunks=13, kl=f)
    (tmp_path / "junk.npz").write_text("not a zip\n")
    with pytest.raises(InferError, match=f"{tmp_path / 'junk.npz'}: not a readable KL base file"):
        infer.perplexity(llm, TEXT, n_ctx=16, kl=tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InferError, match="not an infer KL base file"):
        infer.perplexity(llm, TEXT, n_ctx=16, kl=tmp_path / "other.npz")
    with pytest.raises(InferError, match="KL base file not found"):
        infer.perplexity(llm, TEXT, n_ctx=16, kl=tmp_path / "nope.npz")
    with pytest.raises(InferError, match="no such directory"):
        infer.perplexity(llm, TEXT, n_ctx=16, kl_base=tmp_path / "no" / "base.npz")
    with pytest.raises(InferError, match="at most one"):
        infer.perplexity(llm, TEXT, n_ctx=16, kl=f, kl_base=f)


def test_bad_text(tmp_path):
    llm = FakeLLM()
    with pytest.raises(InferError, match="text is empty"):
        infer.perplexity(llm, "", n_ctx=16)
    with pytest.raises(ContextError, match=r"text has 20 tokens, fewer than the 2 chunks of 16.*\(32\)"):
        infer.perplexity(llm, TEXT[:20], n_ctx=16)
    with pytest.raises(InferError, match=f"{tmp_path / 'missing.txt'}: text file not found"):
        infer.perplexity(llm, tmp_path / "missing.txt", n_ctx=16)
    (tmp_path / "short.txt").write_text("abc\n")
    with pytest.raises(ContextError, match=f"{tmp_path / 'short.txt'}: text has 3 tokens"):
        infer.perplexity(llm, tmp_path / "short.txt", n_ctx=16)
    for kw, msg in (({"n_ctx": 3}, "n_ctx must be at least 4"), ({"n_chunks": 0}, "n_chunks must be positive"),
                    ({"kl_top_k": 0}, "kl_top_k must be positive")):
        with pytest.raises(InferError, match=msg):
            infer.perplexity(llm, TEXT, **kw)


# --- the command line -----------------------------------------------------------------------------
def run_cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "infer.cli", "perplexity", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def one_error_line(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_run_and_kl(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(GPL3.read_text()[:3000] if GPL3.exists() else TEXT * 20)
    base = tmp_path / "base.npz"
    r = run_cli(smollm2_path, "-f", text, "-c", "64", "--chunks", "3", "--kl-base", base, "-t", "1")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^\[(\d)/3\] PPL = [\d.]+$", r.stdout, re.M) == ["1", "2", "3"]
    m = re.search(r"^PPL = ([\d.]+) \+/- ([\d.]+)$", r.stdout, re.M)
    assert m and float(m.group(1)) > 1 and "tokens/s" in r.stdout and base.exists()
    lib = infer.perplexity(smollm2_path, text, n_ctx=64, n_chunks=3, n_threads=1)
    assert float(m.group(1)) == pytest.approx(lib.ppl, abs=1e-4)
    r = run_cli(smollm2_path, "-f", text, "-c", "64", "--kl", base, "-b", "16")
    assert r.returncode == 0, r.stderr
    kld = float(re.search(r"^Mean KLD\s*:\s*(-?[\d.]+)", r.stdout, re.M).group(1))
    assert abs(kld) < 1e-4 and re.search(r"^Same top token\s*:\s*100\.000 %", r.stdout, re.M)


def test_cli_errors(smollm2_path, tmp_path):
    one_error_line(run_cli(smollm2_path, "-f", tmp_path / "missing.txt"), str(tmp_path / "missing.txt"),
                   "not found")
    (tmp_path / "empty.txt").write_text("")
    one_error_line(run_cli(smollm2_path, "-f", tmp_path / "empty.txt"), str(tmp_path / "empty.txt"), "empty")
    (tmp_path / "short.txt").write_text("Hello there, a short text.\n")
    one_error_line(run_cli(smollm2_path, "-f", tmp_path / "short.txt"), str(tmp_path / "short.txt"),
                   "fewer than the 2 chunks of 512")
    one_error_line(run_cli(smollm2_path, "-f", tmp_path / "short.txt", "--kl", tmp_path / "b.npz",
                           "--kl-base", tmp_path / "c.npz"), "at most one")
