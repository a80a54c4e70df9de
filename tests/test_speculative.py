"""Speculative decoding (infer.speculative) on SmolLM2: the model's own greedy text from both
draft sources (prompt lookup, a draft model), the model's own distribution when sampling (against
the exact distribution computed from its logits), context shift, chat prefix reuse, and refusals."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer
from infer.errors import InferError
from infer.generate import Stats
from infer.sampling import Sampler, SamplingParams
from infer.speculative import SpeculativeConfig, speculative_tokens

G = SamplingParams.greedy()
FAMILIES = Path(__file__).parent / "data" / "families"

CODE = "\n".join(f"def f{i}(x, y):\n    return x * {i} + y - {i}" for i in range(6))
PROMPTS = (
    [f"Rewrite this code with type hints:\n\n{CODE}\n\nRewritten:\n", f"Repeat exactly:\n{CODE}\nRepeated:\n",
     "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "The quick brown fox jumps over the lazy dog. The quick brown",
     "<ul>\n<li>apple</li>\n<li>banana</li>\n<li>cherry</li>\n", "class Point:\n    def __init__(self, x, y):\n"]
    + [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(6)]
    + ["Once upon a time", "The capital of France is", "def fibonacci(n):", "import numpy as np\n",
       "Dear Sir or Madam,", "SELECT name, age FROM users WHERE", "Monday, Tuesday, Wednesday,",
       "In 1492, Columbus"])
assert len(PROMPTS) == 20


def _plain_logits(llm, ids, extra):
    e = llm.engine
    e.reset()
    lg = e.prefill(ids).copy()
    for t in extra:
        lg = e.decode(t).copy()
    return lg


def _same_or_near_tie(plain_llm, prompt, want, got, bound):
    """got equals want, or parts from it where want's own logits put the two tokens within bound."""
    if got == want:
        return None
    j = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    assert j < min(len(want), len(got)), (prompt, "one text is a prefix of the other", len(want), len(got))
    lg = _plain_logits(plain_llm, plain_llm.tokenize(prompt), want[:j])
    gap = float(lg[want[j]] - lg[got[j]])
    assert 0 <= gap <= bound, (prompt, j, want[j], got[j], gap)
    return gap


@pytest.fixture(scope="module")
def exact(smollm2_path):
    with infer.LLM(smollm2_path, n_ctx=1024, n_threads=2, int8_activations=False) as m:
        yield m


@pytest.fixture(scope="module")
def plain_default(smollm2_path):
    with infer.LLM(smollm2_path, n_ctx=1024) as m:
        yield m


@pytest.mark.parametrize("source", ["lookup", "draft"])
def test_greedy_text_is_the_models_own_exact_path(exact, smollm2_path, source):
    """20 prompts x 128 tokens (INFER_SPEC_FULL=1; 7 of them by default: the exact path's batched
    passes dequantize every weight): speculative greedy == plain greedy (float activations; a
    draft model that disagrees now and then: the same file on int8 activations, one thread)."""
    prompts = PROMPTS if os.environ.get("INFER_SPEC_FULL") else PROMPTS[::3]     # CI: 7 of the 20
    want = [exact.generate(p, max_tokens=128, sampling=G).tokens for p in prompts]
    draft = infer.LLM(smollm2_path, n_ctx=1024, n_threads=1) if source == "draft" else None
    kw = {"lookup": 3} if source == "lookup" else {"draft": draft}
    try:
        with infer.LLM(smollm2_path, n_ctx=1024, n_threads=2, int8_activations=False,
                       speculative=SpeculativeConfig(adaptive=False, **kw)) as spec:
            drafted = accepted = 0
            for p, w in zip(prompts, want):
                r = spec.generate(p, max_tokens=128, sampling=G)
                _same_or_near_tie(exact, p, w, r.tokens, 2e-3)
                drafted += r.stats.drafted_tokens
                accepted += r.stats.accepted_tokens
    finally:
        if draft is not None:
            draft.close()
    assert drafted > 25 * len(prompts) and 0 < accepted < drafted, (drafted, accepted)     # both outcomes ran


def test_greedy_text_default_path_equal_or_near_tie(plain_default, smollm2_path):
    """Default arguments (int8 activations, default threads): equal, or parted at a near tie
    (a batched pass rounds its activations unlike a decode step)."""
    with infer.LLM(smollm2_path, n_ctx=1024, lookup=3) as spec:
        gaps = []
        for p in PROMPTS[:10]:
            want = plain_default.generate(p, max_tokens=96, sampling=G).tokens
            got = spec.generate(p, max_tokens=96, sampling=G)
            g = _same_or_near_tie(plain_default, p, want, got.tokens, 0.6)
            if g is not None:
                gaps.append(g)
        assert len(gaps) <= 3, gaps


class _FixedDrafter:
    """Drafts the same tokens after every prefix: some accepted, some rejected."""

    def __init__(self, toks):
        self.toks = toks

    def propose(self, hist, k):
        return self.toks[:k]

    def close(self):
        pass


class _MarkovEngine:
    """A tiny model for speculative_tokens: 5 tokens, the logits a fixed function of the last
    token (Engine's prefill/decode/verify/rollback, exact arithmetic, no kernels)."""
    policy, n_ctx, full, cached = "stop", 1 << 20, False, 0

    def __init__(self, table):
        from types import SimpleNamespace
        self.table, self.tokens, self.kv = table, [], SimpleNamespace(offset=0)

    def _lg(self):
        self.kv.offset = len(self.tokens)
        return self.table[self.tokens[-1]].copy()

    def prefill(self, ids):
        self.tokens = list(ids)
        return self._lg()

    def decode(self, t):
        self.tokens.append(int(t))
        return self._lg()

    def verify(self, toks):
        out = []
        for t in toks:
            self.tokens.append(int(t))
            out.append(self._lg())
        return np.array(out)

    def rollback(self, n):
        if n > 0:
            del self.tokens[-n:]


def test_sampling_keeps_the_models_distribution():
    """Temperature 0.8, top-k 4 on a 5-token Markov model: the joint distribution of three sampled
    tokens with drafted second and third tokens (accepted with p(d), else drawn from p without d)
    against the exact one from the model's probabilities, chi-squared at p = 0.001; and the rule
    checked the other way: accepting every draft would fail the same test."""
    rng0 = np.random.default_rng(7)
    table = rng0.normal(0, 1.5, (5, 5)).astype(np.float32)
    sp = SamplingParams(temperature=0.8, top_k=4, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    prompt = [0, 1]

    def step(h):
        idx, pr = Sampler(sp).dist(table[h[-1]], h)
        return {int(i): float(p) for i, p in zip(idx, pr)}
    joint = {}
    for a, pa in step(prompt).items():
        for b, pb in step(prompt + [a]).items():
            for c, pc in step(prompt + [a, b]).items():
                joint[(a, b, c)] = pa * pb * pc
    cfg = SpeculativeConfig(lookup=1, adaptive=False)
    drafts = [_FixedDrafter([int(np.argmax(table[1])), 3, 0])]

    def sample(n, rule_ok=True):
        eng, rng, counts = _MarkovEngine(table), np.random.default_rng(123), {}
        s, tot = Sampler(sp, rng), Stats()
        if not rule_ok:
            import infer.speculative as spm
            orig, spm._check = spm._check, lambda smp, lg, h, d: None       # accept every draft
        try:
            for _ in range(n):
                st = Stats()
                toks = tuple(t for t, _ in speculative_tokens(eng, prompt, s, 3, frozenset(), st, drafts, cfg))
                counts[toks] = counts.get(toks, 0) + 1
                tot.drafted_tokens += st.drafted_tokens
                tot.accepted_tokens += st.accepted_tokens
        finally:
            if not rule_ok:
                spm._check = orig
        return counts, tot

    def chi2(counts, n):
        big = [c for c in joint if joint[c] * n >= 5]
        rest = [c for c in joint if c not in big]
        obs = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in rest)]
        exp = [joint[c] * n for c in big] + [sum(joint[c] for c in rest) * n]
        return sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0), len(big)

    n = 20000
    counts, st = sample(n)
    assert set(counts) <= set(joint)
    x2, df = chi2(counts, n)
    # chi-squared critical values at p = 0.001 by degrees of freedom (Wilson-Hilferty above 30)
    z = 3.090
    crit = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert x2 < crit, (x2, df, crit)
    assert 0.1 * st.drafted_tokens < st.accepted_tokens < 0.9 * st.drafted_tokens    # both outcomes, often
    bad, _ = sample(4000, rule_ok=False)
    assert chi2(bad, 4000)[0] > 3 * crit


def test_context_shift_runs_past_the_context(smollm2_path):
    """A ring of 96 tokens, 200 generated with drafts every round (not adaptive: timing-free):
    rejected drafts leave the ring, the text before the first shift is the plain one's."""
    spec = SpeculativeConfig(lookup=3, adaptive=False)
    with infer.LLM(smollm2_path, n_ctx=96, n_threads=2, int8_activations=False, context_policy="shift") as plain, \
            infer.LLM(smollm2_path, n_ctx=96, n_threads=2, int8_activations=False, context_policy="shift",
                      speculative=spec) as sp:
        p = "red green blue red green blue red green blue red green"
        a = plain.generate(p, max_tokens=200, sampling=G)
        b = sp.generate(p, max_tokens=200, sampling=G)
        assert b.finish_reason == "length" and len(b.tokens) == 200
        n_before = 96 - len(plain.tokenize(p)) - 8      # tokens generated before the first shift
        assert b.tokens[:n_before] == a.tokens[:n_before]
        assert b.stats.drafted_tokens > 0 and b.stats.accepted_tokens > 0


def test_chat_prefix_reuse_with_speculation(exact, smollm2_path):
    msgs = [{"role": "user", "content": "List three fruits, one per line."}]
    with infer.LLM(smollm2_path, n_ctx=1024, n_threads=2, int8_activations=False, lookup=3) as spec:
        r1 = spec.chat(msgs, max_tokens=40, sampling=G)
        msgs2 = msgs + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And three more."}]
        r2 = spec.chat(msgs2, max_tokens=40, sampling=G)
        assert r2.stats.cached_tokens > len(spec.chat_tokens(msgs)) - 2
    w1 = exact.chat(msgs, max_tokens=40, sampling=G)
    w2 = exact.chat(msgs2, max_tokens=40, sampling=G)
    assert (r1.tokens, r2.tokens) == (w1.tokens, w2.tokens)


def test_refusals(smollm2_path):
    other = FAMILIES / "qwen2.gguf"
    with pytest.raises(InferError, match="vocabulary differs"):
        infer.LLM(smollm2_path, n_ctx=256, draft=other)
    with pytest.raises(InferError, match="--lookup"):
        infer.LLM(smollm2_path, n_ctx=256, lookup=-1)
    with pytest.raises(InferError, match="draft-max"):
        infer.LLM(smollm2_path, n_ctx=256, lookup=2, draft_max=0)
    exe = Path(sys.executable).with_name("infer")
    r = subprocess.run([str(exe), "generate", str(smollm2_path), "-p", "hi", "-n", "4", "--draft", str(other)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "vocabulary differs" in lines[0], r.stderr


def test_serve_engine_speculates_for_a_lone_sequence(exact, smollm2_path):
    """BatchEngine (infer serve) with lookup drafts: a lone sequence's greedy text is the plain
    one's (exact path), max_tokens and the per-sequence context end it where a plain run ends;
    two sequences at once run batched steps with no drafts."""
    spec = SpeculativeConfig(lookup=3, adaptive=False)
    llm = infer.LLM(smollm2_path, n_ctx=512, n_threads=2, int8_activations=False)
    engines = []
    try:
        eng = infer.BatchEngine(llm, parallel=2, n_ctx=1024, speculative=spec)
        engines.append(eng)
        for p in (PROMPTS[0], PROMPTS[2], PROMPTS[13]):
            want = exact.generate(p, max_tokens=64, sampling=G).tokens
            got = eng.generate(p, max_tokens=64, sampling=G)
            assert len(got.tokens) == len(want)
            _same_or_near_tie(exact, p, want, got.tokens, 2e-3)
        assert eng.metrics.accepted > 20 and eng.metrics.drafted > eng.metrics.accepted
        r = eng.generate(PROMPTS[1], max_tokens=7, sampling=G)
        assert len(r.tokens) == 7 and r.finish_reason == "length" and r.stats.drafted_tokens > 0
        # two at once: no drafts while both run
        d0 = eng.metrics.drafted
        streams = [eng.stream(p, max_tokens=24, sampling=G) for p in (PROMPTS[3], PROMPTS[4])]
        firsts = [next(s) for s in streams]
        assert all(c.finish_reason is None for c in firsts)
        outs = [[c.token for c in s if c.token is not None] for s in streams]
        assert all(len(o) == 23 for o in outs)
        assert eng.metrics.drafted - d0 < 24        # only a survivor's tail, alone, may draft
        # the context of one sequence, both policies: where and how a plain engine ends
        for policy, n_tok in (("stop", 200), ("shift", 120)):
            pl = infer.BatchEngine(llm, parallel=1, n_ctx=64, policy=policy)
            sp = infer.BatchEngine(llm, parallel=1, n_ctx=64, policy=policy, speculative=spec)
            engines += [pl, sp]
            p = "red green blue red green blue red green blue"
            a, b = pl.generate(p, max_tokens=n_tok, sampling=G), sp.generate(p, max_tokens=n_tok, sampling=G)
            assert (b.finish_reason, len(b.tokens)) == (a.finish_reason, len(a.tokens)), policy
            assert b.tokens == a.tokens and b.stats.accepted_tokens > 0, policy
    finally:
        for e in engines:
            e.close()
        llm.close()


def test_lookup_follows_the_copied_source():
    """A rewrite copies its original in order: the drafts follow the source being copied, and
    after the model departs from it they resume from where the source left off (not from the
    latest occurrence of a repeated n-gram, such as the model's own copy of an earlier line)."""
    from infer.speculative import LookupDrafter, pass_fit
    d = LookupDrafter(3)
    src = [1, 2, 3, 9, 4, 5, 6, 1, 2, 3, 8, 4, 5, 6, 1, 2, 3, 7]     # three "lines" that differ in one token
    h = src + [50, 1, 2, 3]
    assert d.propose(h, 4) == [9, 4, 5, 6]           # the first line, where the copy starts
    h += [9, 4]
    assert d.propose(h, 4) == [5, 6, 1, 2]           # still copying: the source goes on
    h += [5, 6, 1, 2, 3, 8]
    assert d.propose(h, 3) == [4, 5, 6]              # the second line's own 8, then on
    h += [4, 99, 1, 2, 3]                             # the model departs, then writes "1 2 3" again
    assert d.propose(h, 2) == [7, 50]                 # the third line: after where the copy left off
    assert d.propose([5, 6, 5, 6, 5], 2) == [6, 5]    # another text: its own tables
    assert [pass_fit(k, 8) for k in range(1, 9)] == [1, 3, 3, 7, 7, 7, 7, 7]


def test_pace_backs_off_while_drafts_keep_failing():
    """Speculation that does not pay turns itself off for OFF_TOKENS plain tokens, twice as long
    each time in a row (up to OFF_MAX), and back to OFF_TOKENS after a round that pays."""
    from infer.speculative import OFF_MAX, OFF_TOKENS, _Pace
    p = _Pace(8, True)
    for _ in range(3):
        p.plain(0.010)                  # a plain step: 10 ms
    assert p.want()

    def off_after_failing_round():
        for _ in range(10):             # decaying sums: a failing round after good ones may not turn it off yet
            p.round(4, 0, 0.030)        # 30 ms for one token: worse than plain
            if not p.want():
                break
        n = 0
        while not p.want():
            p.plain(0.010)
            n += 1
        return n

    offs = [off_after_failing_round() for _ in range(6)]
    assert offs == [min(OFF_MAX, OFF_TOKENS * 2 ** i) for i in range(6)], offs
    p.round(4, 4, 0.015)                # 5 tokens in 15 ms: pays
    assert p.want() and p.k == 3            # 1 after the failures, + 2 on full acceptance
    assert off_after_failing_round() == OFF_TOKENS
