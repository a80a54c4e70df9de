"""RingKVCache and the context policies: bookkeeping on a fake config (fast, exact), RoPE handling
on SmolLM2 (a shifted ring scores exactly like llama.cpp's re-indexed cache), long generations,
and the perplexity of a text streamed through a small ring."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import infer
from infer.config import ModelConfig
from infer.errors import ContextError
from infer.kernels.ops import ROPE_NORM, rope, rope_inv_freq
from infer.kv_cache import KVCache, RingKVCache

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def tiny_cfg(**kw):
    base = dict(arch="llama", n_vocab=10, n_ctx_train=64, dim=8, n_layers=2, n_ff=16, n_heads=2,
                n_kv_heads=1, head_dim=4, rope_dim=4, rope_base=10000.0, rope_neox=False, norm_eps=1e-5,
                attn_bias=False)
    base.update(kw)
    return ModelConfig(**base)


def fill(kv, n):
    """Write n tokens one at a time; each key row holds its token's position (in the value cache,
    which is never rotated) so the test can see who lives where."""
    for _ in range(n):
        s = kv.next_slot()
        kv.v[:, :, s, :] = kv.kpos[s]


def held(kv):
    """Positions of the window tokens held, from the values (sorted) and from kpos."""
    n = kv.offset
    vals = sorted(int(x) for x in kv.v[0, 0, kv.keep:n, 0])
    assert vals == sorted(int(p) for p in kv.kpos[kv.keep:n])
    return vals


# --- bookkeeping --------------------------------------------------------------------------------
def test_ring_keeps_sinks_and_most_recent():
    kv = RingKVCache(tiny_cfg(), 8, keep=2)
    fill(kv, 8)
    assert (kv.offset, kv.pos, kv.wrapped) == (8, 8, False)
    assert list(kv.kpos) == list(range(8))
    fill(kv, 5)                                   # positions 8..12 evict 2..6
    assert (kv.offset, kv.pos, kv.wrapped) == (8, 13, True)
    assert held(kv) == [7, 8, 9, 10, 11, 12]
    assert kv.oldest == 7 and kv.sink_base == 5 and list(kv.kpos[:2]) == [5, 6]
    assert list(kv.v[0, 0, :2, 0]) == [0, 1]     # the sinks' values never move
    before = kv.k.copy()
    fill(kv, 100)
    assert kv.k.shape == before.shape and kv.offset == 8 and held(kv) == list(range(107, 113))


def test_ring_trim_keeps_recent_and_compacts():
    kv = RingKVCache(tiny_cfg(), 8, keep=2)
    fill(kv, 11)                                  # window holds 5..10, wrapped
    assert kv.trim(9) == 9                        # drop 9 and 10: still in the cache
    assert (kv.offset, kv.pos) == (6, 9) and held(kv) == [5, 6, 7, 8]
    # filled slots stay 0..offset-1, oldest first (what decode's attention reads)
    assert list(kv.kpos[2:6]) == [5, 6, 7, 8]
    fill(kv, 3)
    assert (kv.offset, kv.pos) == (8, 12) and held(kv) == [6, 7, 8, 9, 10, 11]
    assert kv.trim(3) == 0 and kv.offset == 0     # token 3 was evicted: start over
    fill(kv, 5)
    assert kv.trim(3) == 3 and list(kv.kpos[:3]) == [0, 1, 2] and not kv.wrapped


def test_ring_prefill_chunk_evicts_oldest_first():
    kv = RingKVCache(tiny_cfg(), 8, keep=2)
    fill(kv, 8)
    s = kv.slots_for(3)
    assert sorted(s) == [2, 3, 4] and list(kv.kpos[s]) == [8, 9, 10]
    assert kv.oldest == 5 and kv.sink_base == 3
    with pytest.raises(ContextError):
        kv.slots_for(7)                           # more than the window at once


@pytest.mark.parametrize("max_size,keep", [(8, 8), (8, 9), (8, -1), (1, 0)])
def test_ring_rejects_nonsense(max_size, keep):
    with pytest.raises(ContextError):
        RingKVCache(tiny_cfg(), max_size, keep)


def test_linear_cache_refuses_overflow():
    kv = KVCache(tiny_cfg(), 4)
    kv.slots_for(3)
    with pytest.raises(ContextError):
        kv.slots_for(2)


def test_rope_relative_at_huge_positions():
    """Keys are kept rotated at absolute positions, which grow without bound: q.k must depend only on
    the distance, at position 10^7 as at position 10 (float64 angles)."""
    rng = np.random.default_rng(0)
    d, hd = 37, 64
    inv = np.zeros(hd // 2)
    rope_inv_freq(hd, 10000.0, inv)
    q0, k0 = rng.standard_normal((2, 1, hd)).astype(np.float32)
    dots = []
    for base in (10, 10 ** 5, 10 ** 7):
        q, k = q0.copy(), k0.copy()
        rope(q, 1, hd, hd, np.array([base + d]), inv, ROPE_NORM)
        rope(k, 1, hd, hd, np.array([base]), inv, ROPE_NORM)
        dots.append(float((q @ k.T)[0, 0]))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5, atol=1e-5)


# --- SmolLM2 ------------------------------------------------------------------------------------
def gpl_ids(llm, n):
    return llm.tokenize(GPL3.read_text())[:n]


def reindexed_reference(llm_ring, llm_ref):
    """Load the ring into a linear cache as llama.cpp's context shift would leave it just before the
    next token: the oldest window token dropped (the ring evicts it for the next token), the sinks
    at positions 0..keep-1, the rest of the window right after, each key re-rotated there."""
    kv, ref = llm_ring.engine.kv, llm_ref.engine.kv
    c = llm_ring.config
    window = kv.keep + np.argsort(kv.kpos[kv.keep:kv.offset])
    order = np.concatenate([np.arange(kv.keep), window[1:]])    # without the oldest
    n = len(order)
    delta = np.arange(n) - kv.kpos[order]                       # logical - stored position
    rows = kv.k[:, :, order].transpose(2, 0, 1, 3).reshape(-1, c.head_dim).copy()
    inv = np.zeros(c.rope_dim // 2)
    rope_inv_freq(c.rope_dim, c.rope_base, inv)
    rope(rows, 1, c.head_dim, c.rope_dim, np.repeat(delta, c.n_layers * c.n_kv_heads), inv, ROPE_NORM)
    ref.reset()
    ref.k[:, :, :n] = rows.reshape(n, c.n_layers, c.n_kv_heads, c.head_dim).transpose(1, 2, 0, 3)
    ref.v[:, :, :n] = kv.v[:, :, order]
    ref.kpos[:n] = np.arange(n)
    ref.offset = n
    llm_ref.engine.tokens = [0] * n


@pytest.mark.parametrize("keep,path", [(4, "decode"), (0, "decode"), (4, "prefill")])
def test_shift_scores_like_reindexed_cache(smollm2_path, keep, path):
    """After the window has slid by a hundred positions (token by token, or by a prompt run in
    chunks that evict), the next token's logits equal those of a linear cache holding the same keys
    and values re-indexed from position 0 (llama.cpp's shift): the sinks' virtual positions and the
    window's absolute ones give the logical distances."""
    with infer.LLM(smollm2_path, n_ctx=40, context_policy="shift", n_keep=keep, n_threads=1,
                   int8_activations=False) as ring, \
            infer.LLM(smollm2_path, n_ctx=40, n_threads=1, int8_activations=False) as ref:
        ids = gpl_ids(ring, 140)
        if path == "prefill":
            ring.engine.prefill(ids[:130])
            assert ring.engine.shift_block == 4 and ring.engine.tokens == ids[:130]
        else:
            ring.engine.prefill(ids[:30])
            for t in ids[30:130]:
                ring.engine.decode(t)
        assert ring.engine.kv.pos == 130 and ring.engine.kv.wrapped
        for t in ids[130:134]:
            reindexed_reference(ring, ref)
            want = ref.engine.decode(t).copy()
            got = ring.engine.decode(t).copy()
            assert ring.engine.kv.offset == 40 and ref.engine.kv.offset == 40
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
            assert int(np.argmax(got)) == int(np.argmax(want))


def test_stop_policy_ends_with_context(smollm2_path):
    with infer.LLM(smollm2_path, n_ctx=64, n_threads=1) as llm:
        ids = gpl_ids(llm, 40)
        r = llm.generate(ids, max_tokens=100, sampling=infer.SamplingParams.greedy())
        assert r.finish_reason == "context" and llm.n_tokens == 64 and len(r.tokens) == 25
        with pytest.raises(ContextError, match="does not fit the context"):
            llm.generate(gpl_ids(llm, 64), max_tokens=4)
        with pytest.raises(ContextError):
            llm.engine.decode(ids[0])                 # full: refused, nothing overwritten
        r = llm.generate(ids, max_tokens=5, sampling=infer.SamplingParams.greedy())
        assert r.finish_reason == "length"


@pytest.mark.parametrize("kw", [dict(context_policy="shift", n_keep=64), dict(context_policy="shift", n_keep=-1),
                                dict(context_policy="slide"), dict(n_ctx=0)])
def test_nonsense_context_settings_refused(smollm2_path, kw):
    kw = {"n_ctx": 64, **kw}
    with pytest.raises(infer.InferError):
        infer.LLM(smollm2_path, **kw)


def test_shift_generates_4x_the_context_in_constant_memory(smollm2_path):
    """n_ctx 256 under shift: 1,024 generated tokens (end-of-text tokens do not stop it), no crash, the
    cache's arrays untouched in size, no memory growth with the length, and text that still reads as
    text at the end."""
    import tracemalloc
    from infer.generate import Stats, generate_tokens
    from infer.sampling import Sampler
    with infer.LLM(smollm2_path, n_ctx=256, context_policy="shift", n_keep=4, n_threads=1) as llm:
        kv = llm.engine.kv
        arrays = (kv.k, kv.v, kv.kpos)
        nbytes = kv.nbytes
        sp = infer.SamplingParams(temperature=0.7, repeat_penalty=1.1, seed=7)
        prompt = llm.tokenize("Once upon a time, in a small village at the edge of a great forest,")
        toks, mem = [], {}
        tracemalloc.start()
        try:
            for i, (tok, reason) in enumerate(generate_tokens(llm.engine, prompt, Sampler(sp), 1024,
                                                              frozenset(), Stats())):
                toks.append(tok)
                if i in (300, 1023):
                    mem[i] = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert reason == "length" and len(toks) == 1024
        assert (kv.k, kv.v, kv.kpos) == arrays and kv.nbytes == nbytes
        assert kv.offset == 256 and kv.pos == len(prompt) + 1023 and kv.wrapped
        assert mem[1023] - mem[300] < 256 * 1024          # a token list grows; nothing else does
        tail = llm.detokenize(toks[-300:], skip_special=True)
        words = tail.split()
        assert len(words) > 100 and len(set(words)) > 50
        letters = sum(ch.isalpha() or ch.isspace() or ch in ".,;:'\"!?-()" for ch in tail)
        assert letters / len(tail) > 0.95


# --- perplexity through the ring ------------------------------------------------------------------
def stream_nll(llm, ids):
    """Run ids token by token through llm's context; NLL of ids[1:] (each given all it may see)."""
    eng = llm.engine
    eng.reset()
    nll = np.zeros(len(ids))
    logits = eng.prefill(ids[:1], reuse=False)
    for i in range(1, len(ids)):
        z = logits.astype(np.float64)
        m = z.max()
        nll[i] = m + math.log(np.exp(z - m).sum()) - z[ids[i]]
        if i + 1 < len(ids):
            logits = eng.decode(ids[i])
    return nll


def scored_targets(n_chunks, n_ctx=512):
    """Indices of the tokens llama-perplexity scores (the targets of positions n_ctx/2 .. n_ctx-2)."""
    return np.concatenate([c * n_ctx + np.arange(n_ctx // 2, n_ctx - 1) + 1 for c in range(n_chunks)])


def test_shift_perplexity_close_to_chunked(smollm2_path):
    """The first 1,024 GPL-3 tokens one by one through a 256-slot ring (4 sinks, shift): the tokens
    llama-perplexity scores with n_ctx 512 score within 10% of its figure (the full text: bench/shift_ppl.py)."""
    if not GPL3.exists():
        pytest.skip(f"{GPL3} is absent")
    with infer.LLM(smollm2_path, n_ctx=512, n_threads=1) as llm:
        chunked = infer.perplexity(llm, GPL3, n_ctx=512, n_chunks=2)
        ids = gpl_ids(llm, 1024)
    with infer.LLM(smollm2_path, n_ctx=256, context_policy="shift", n_keep=4, n_threads=1) as ring:
        nll = stream_nll(ring, ids)
        assert ring.engine.kv.wrapped and ring.engine.kv.offset == 256
    ppl = math.exp(nll[scored_targets(2)].mean())
    assert abs(ppl / chunked.ppl - 1) < 0.10, (ppl, chunked.ppl)
