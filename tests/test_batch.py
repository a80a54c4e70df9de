"""The multi-sequence engine (infer.BatchEngine) on SmolLM2: a batched decode step equals each
sequence's own decode, several requests at once give each the text it gets alone, the prefix
cache restores exactly what a fresh prefill computes, context limits and shift per sequence,
cancellation, errors."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import infer
from infer.batch import BatchEngine, QueueFullError

G = infer.SamplingParams.greedy()
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The quick brown fox",
           "In 1492, Columbus", "Water boils at", "My favourite food is", "The meaning of life is"]


@pytest.fixture(scope="module", params=[(1, False), (2, False), (1, True), (2, True), (None, True)],
                ids=["1t-exact", "2t-exact", "1t-int8", "2t-int8", "default"])
def llm(request, smollm2_path):
    th, i8 = request.param
    kw = {} if th is None else {"n_threads": th, "int8_activations": i8}
    with infer.LLM(smollm2_path, n_ctx=512, **kw) as m:
        m.exact = th is not None and not i8
        yield m


def _single_logits(llm, prompt_ids, extra):
    eng = llm.engine
    eng.reset()
    lg = eng.prefill(prompt_ids).copy()
    out = [lg]
    for t in extra:
        out.append(eng.decode(t).copy())
    return out


def test_batched_step_equals_each_sequences_decode(llm):
    """Three sequences at different lengths, decoded in one step: each row's logits are its own
    sequence's (exact path: float rounding only; int8: the same activations' quantization)."""
    eng = BatchEngine(llm, parallel=3, n_ctx=3 * 256)
    try:
        m, s = llm.model, eng.scratch
        ids = [llm.tokenize(p, add_bos=True) for p in PROMPTS[:3]]
        nxt = [11, 22, 33]
        for i, kv in enumerate(s_.kv for s_ in eng.slots):
            kv.reset()
            m.prefill(s, kv, ids[i])
        rows = m.decode_batch(s, eng.pool, [0, 1, 2], [x.kv for x in eng.slots], nxt, eng.logits).copy()
        for i in range(3):
            want = _single_logits(llm, ids[i], [nxt[i]])[1]
            d = np.abs(rows[i] - want).max()
            assert d <= (2e-3 if llm.exact else 0.6), (i, d)
            if llm.exact:
                assert rows[i].argmax() == want.argmax()
        # a row's result does not depend on the other rows of the step (what makes a stream's
        # text independent of the load): on int8 activations to the last bit; the exact path's
        # single row runs decode's matvec, several rows BLAS (float rounding)
        for kv in (x.kv for x in eng.slots):
            kv.trim(kv.offset - 1)
        one = m.decode_batch(s, eng.pool, [1], [eng.slots[1].kv], [nxt[1]], eng.logits).copy()
        np.testing.assert_allclose(one[0], rows[1], atol=2e-3 if llm.exact else 1e-5, rtol=0)
    finally:
        eng.close()


def _same_or_near_tie(llm, prompt, alone, got, bound):
    """got (a stream's tokens while other streams shared its steps) equals alone (the stream by
    itself: the fused one-token step) up to a near tie: where they part, alone's own logits
    put the two tokens within `bound` (the batched step's rows differ from the fused step's by
    float rounding on the exact path, by activation rounding on int8)."""
    if got == alone:
        return
    j = next(i for i, (x, y) in enumerate(zip(got, alone)) if x != y)
    lg = _single_logits(llm, llm.tokenize(prompt), alone[:j])[-1]      # as generate tokenizes it
    gap = float(lg[alone[j]] - lg[got[j]])
    assert 0 <= gap <= bound, (prompt, j, alone[j], got[j], gap)


def test_concurrent_greedy_equals_alone(llm):
    """8 requests from 8 threads on 3 sequences (5 wait for a slot): each gets its greedy text
    alone through the same engine (which is LLM.generate's), up to a near tie where a batched
    step's rounding differs from the lone sequence's fused step; batch_invariant (every step
    batched): exactly on int8."""
    eng = BatchEngine(llm, parallel=3, n_ctx=3 * 256)
    try:
        alone = [eng.generate(p, max_tokens=24, sampling=G) for p in PROMPTS]
        got = [None] * len(PROMPTS)

        def run(i):
            got[i] = eng.generate(PROMPTS[i], max_tokens=24, sampling=G)
        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        for p, g, a in zip(PROMPTS, got, alone):
            _same_or_near_tie(llm, p, a.tokens, g.tokens, 2e-3 if llm.exact else 0.6)
        assert eng.metrics.batch_rows > eng.metrics.steps          # steps did run several rows
        ref = [llm.generate(p, max_tokens=24, sampling=G) for p in PROMPTS]
        assert [a.tokens for a in alone] == [r.tokens for r in ref]
        assert [a.text for a in alone] == [r.text for r in ref]
        # every step batched: a row's result does not depend on the rows beside it (to the bit on
        # int8), so the texts are the same whatever the load
        eng.close()
        eng = BatchEngine(llm, parallel=3, n_ctx=3 * 256, batch_invariant=True)
        alone = [eng.generate(p, max_tokens=24, sampling=G) for p in PROMPTS]
        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        if llm.exact:
            for p, g, a in zip(PROMPTS, got, alone):
                _same_or_near_tie(llm, p, a.tokens, g.tokens, 2e-3)
        else:
            assert [g.tokens for g in got] == [a.tokens for a in alone]
    finally:
        eng.close()


def test_prefix_cache_restores_what_prefill_computes(llm):
    """A long shared prefix: the second request reuses it (from its slot, then from the store after
    the slot was taken by others) and generates what a fresh context does."""
    system = "Rules of the house: " + " ".join(f"rule {i} is to be kind to guest {i}." for i in range(30))
    eng = BatchEngine(llm, parallel=1, n_ctx=512, prefix_cache_mb=64)
    try:
        a = eng.generate(system + " Question: who?", max_tokens=8, sampling=G)
        b = eng.generate(system + " Question: why?", max_tokens=8, sampling=G)
        n_sys = len(llm.tokenize(system, add_bos=True))
        assert b.stats.cached_tokens >= n_sys - 2
        eng.generate("Something else entirely, to take the only slot.", max_tokens=4, sampling=G)
        c = eng.generate(system + " Question: how?", max_tokens=8, sampling=G)
        assert c.stats.cached_tokens >= n_sys - 2 and eng.store.hits >= 1
        fresh = BatchEngine(llm, parallel=1, n_ctx=512, prefix_cache_mb=0)
        try:
            for r, q in ((b, "why"), (c, "how")):
                want = fresh.generate(system + f" Question: {q}?", max_tokens=8, sampling=G)
                assert r.tokens == want.tokens
        finally:
            fresh.close()
        assert a.stats.cached_tokens == 0
    finally:
        eng.close()


def test_context_per_sequence(llm):
    eng = BatchEngine(llm, parallel=2, n_ctx=2 * 48)
    try:
        r = eng.generate("1, 2, 3, 4,", max_tokens=200, sampling=G)
        assert r.finish_reason == "context" and r.stats.prompt_tokens + len(r.tokens) == 48 + 1
        with pytest.raises(infer.ContextError):
            eng.generate("word " * 60, max_tokens=4)
    finally:
        eng.close()
    eng = BatchEngine(llm, parallel=2, n_ctx=2 * 48, policy="shift")
    try:
        r = eng.generate("1, 2, 3, 4,", max_tokens=80, sampling=G)
        assert r.finish_reason == "length" and len(r.tokens) == 80
        if llm.exact:       # the same ring semantics as one context under context_policy="shift"
            with infer.LLM(llm.path, n_ctx=48, n_threads=llm.n_threads, context_policy="shift",
                           int8_activations=False) as one:
                want = one.generate("1, 2, 3, 4,", max_tokens=80, sampling=G)
            # the batch engine's ring prefills in chunks of window/8 (as LLM's does when full)
            assert r.tokens == want.tokens
    finally:
        eng.close()


def test_cancel_frees_the_sequence(llm):
    eng = BatchEngine(llm, parallel=2, n_ctx=2 * 256)
    try:
        it = eng.stream("1, 2, 3, 4,", max_tokens=200, sampling=G)
        next(it), next(it)
        assert eng.active == 1
        it.close()
        t0 = time.time()
        while eng.active and time.time() - t0 < 5:
            time.sleep(0.01)
        assert eng.active == 0 and eng.metrics.finished.get("cancelled") == 1
    finally:
        eng.close()


def test_async_streams_and_errors(llm):
    eng = BatchEngine(llm, parallel=2, n_ctx=2 * 128, max_queue=1)
    try:
        async def two():
            async def one(p):
                return "".join([c.text async for c in eng.astream(p, max_tokens=12, sampling=G)])
            return await asyncio.gather(one(PROMPTS[0]), one(PROMPTS[1]))
        texts = asyncio.run(two())
        assert texts == [eng.generate(p, max_tokens=12, sampling=G).text for p in PROMPTS[:2]]
        with pytest.raises(infer.InferError, match="max_tokens"):
            eng.submit("x", lambda c: None, max_tokens=0)
        with pytest.raises(infer.ContextError, match="out of range"):
            eng.submit([10 ** 7], lambda c: None)
        # two running, one waiting: the next is refused
        its = [eng.stream("1, 2, 3,", max_tokens=100, sampling=G) for _ in range(2)]
        for it in its:
            next(it)
        eng.submit("wait", lambda c: None, max_tokens=2)
        with pytest.raises(QueueFullError):
            eng.submit("refused", lambda c: None, max_tokens=2)
        for it in its:
            it.close()
    finally:
        eng.close()


def test_fused_steps_chosen_by_measured_times_and_retried():
    """BatchEngine._fused_pays: n fused one-token steps only when the engine measured them cheaper
    than a batched pass of n rows, and a batched pass again every FUSED_RETRY steps (so a time
    measured under another load of the machine is refreshed)."""
    from types import SimpleNamespace
    e = SimpleNamespace(_t_fused=None, _t_batch={}, _fused_run={}, FUSED_RETRY=BatchEngine.FUSED_RETRY)
    pays = lambda n: BatchEngine._fused_pays(e, n)      # noqa: E731
    assert not pays(2)                                  # nothing measured yet
    e._t_fused = 0.01
    assert not pays(2)                                  # no batched pass of 2 rows measured
    e._t_batch[2] = 0.019
    assert not pays(2)                                  # 2 x 0.01 > 0.019: batched
    e._t_batch[3] = 0.05
    got = [pays(3) for _ in range(2 * e.FUSED_RETRY)]
    assert got.count(False) == 2 and not got[e.FUSED_RETRY - 1] and not got[-1]
    assert all(got[:e.FUSED_RETRY - 1])
