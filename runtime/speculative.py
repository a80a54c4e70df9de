"""Speculative decoding: cheap guesses of the next tokens, checked by the model in one pass.

Decode reads every weight once per token; running k + 1 tokens through the prompt path costs far
less than k + 1 decode steps, so each drafted token the model agrees with is nearly free. Drafts
come from a smaller model with the same vocabulary (ModelDrafter) or from the text itself
(LookupDrafter: the tokens that followed the latest earlier occurrence of the last n tokens, for
edits, rewrites, code and quoting).

The model's output does not change: greedy decoding keeps the longest drafted prefix the model's
own choice agrees with, then the model's token where they part; sampling accepts a drafted token d
with the model's probability p(d) (drafts are deterministic, a point mass) and otherwise samples
from p with d taken out, which leaves each token's distribution the model's. Rejected drafts'
keys and values are dropped from the cache (Engine.rollback; ring caches too).

The draft length adapts: it grows while every draft is accepted and shrinks to what was accepted
otherwise; and speculation turns itself off for a while when a round's time per produced token is
above a plain decode step's (measured in the same run), then tries again.
"""
from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InferError
from .generate import finish_reason

OFF_TOKENS = 32        # tokens decoded plainly after speculation did not pay, before trying again
OFF_MAX = 256          # ... doubled each time it still does not pay, up to this


@dataclass
class SpeculativeConfig:
    """draft: a GGUF path (or an open LLM) with the model's vocabulary; lookup: n-gram length for
    drafts looked up in the prompt and the text so far (0: off; with a draft model, lookup is
    tried first); draft_max: most tokens drafted per round; adaptive: draft length and on/off
    follow the acceptance rate and the measured speed."""
    draft: Any = None
    lookup: int = 0
    draft_max: int = 8
    adaptive: bool = True

    def __post_init__(self):
        if self.draft is None and not self.lookup:
            raise InferError("speculative decoding needs a draft model or --lookup N (an n-gram length >= 1)")
        if self.lookup < 0 or not 1 <= self.draft_max <= 32:
            raise InferError(f"--lookup must be >= 0 and --draft-max in 1..32 (got {self.lookup}, {self.draft_max})")


class LookupDrafter:
    """Prompt lookup: drafts copied from earlier in the text. While the model is copying (each
    draft it accepted, or the token it chose, equals what follows the source), the drafts keep
    following that source; otherwise the longest n <= N whose last n tokens occurred before picks
    a new one: of their occurrences, the first at or after where the last source left off (a
    rewrite copies its original in order, and a recent occurrence of a repeated line, such as the
    model's own copy of an earlier line, would draft the wrong continuation), else the latest."""

    def __init__(self, n: int):
        self.n = n
        self.tables = [dict() for _ in range(n + 1)]        # n-gram -> positions that follow it, ascending
        self.seen: list[int] = []
        self.src = None         # position of the token expected next while copying
        self.upto = 0           # the text length src is aligned with
        self.last_src = 0       # where the last source left off

    def _sync(self, hist):
        s = self.seen
        if len(hist) < len(s) or hist[:len(s)] != s:        # another text: start over
            self.tables = [dict() for _ in range(self.n + 1)]
            s = self.seen = []
            self.src, self.upto, self.last_src = None, 0, 0
        for i in range(len(s), len(hist)):
            # n-grams ending just before token i, whose continuation (token i) is now known
            for n in range(1, self.n + 1):
                if i - n >= 0:
                    self.tables[n].setdefault(tuple(hist[i - n:i]), []).append(i)
            s.append(hist[i])

    def _follow(self, hist):
        """Advance the copy source over the tokens the text gained; None once they differ."""
        src = self.src
        while src is not None and self.upto < len(hist):
            if src >= self.upto or hist[src] != hist[self.upto]:
                self.last_src = src
                src = None
                break
            src += 1
            self.upto += 1
        self.src = src

    def propose(self, hist, k):
        self._sync(hist)
        self._follow(hist)
        L = len(hist)
        if self.src is None:
            lo = 2 if self.n >= 2 else 1          # single-token matches draft noise
            for n in range(min(self.n, L - 1), lo - 1, -1):
                at = self.tables[n].get(tuple(hist[-n:]))
                if at:
                    i = bisect.bisect_left(at, self.last_src)
                    self.src = at[i] if i < len(at) and at[i] < L else at[-1]
                    break
            if self.src is None:
                return []
            self.upto = L
        if self.src >= L:
            self.src = None
            return []
        return list(hist[self.src:self.src + k])

    def close(self):
        pass


class ModelDrafter:
    """A smaller model's greedy continuation, its context kept in step with the text (its engine's
    prefix reuse runs only the tokens it has not seen)."""

    def __init__(self, llm, own: bool):
        self.llm, self.own = llm, own
        self.engine = llm.engine

    def propose(self, hist, k):
        e = self.engine
        if e.policy == "stop" and len(hist) + k > e.n_ctx:
            k = e.n_ctx - len(hist)
            if k <= 0:
                return []
        logits = e.prefill(hist)
        out = []
        for i in range(k):
            t = int(np.argmax(logits))
            out.append(t)
            if i < k - 1:
                logits = e.decode(t)
        return out

    def close(self):
        if self.own:
            self.llm.close()


def open_drafters(cfg: SpeculativeConfig, target) -> list:
    """The drafters of cfg for the LLM `target`; a draft model must share its vocabulary."""
    out = []
    if cfg.lookup:
        out.append(LookupDrafter(int(cfg.lookup)))
    if cfg.draft is not None:
        own = isinstance(cfg.draft, (str, os.PathLike))
        if own:
            from .api import LLM
            d = LLM(cfg.draft, n_ctx=target.n_ctx, n_threads=target.n_threads,
                    context_policy=target.context_policy, n_keep=target.n_keep,
                    int8_activations=target.engine.scratch.use_i8)
        else:
            d = cfg.draft
        try:
            check_vocab(target, d)
        except BaseException:
            if own:
                d.close()
            raise
        out.append(ModelDrafter(d, own))
    return out


def check_vocab(target, draft):
    a, b = target.tokenizer, draft.tokenizer
    ta, tb = target.metadata.get("tokenizer.ggml.tokens"), draft.metadata.get("tokenizer.ggml.tokens")
    same = ta is not None and tb is not None and len(ta) == len(tb) and \
        all(ta[i] == tb[i] for i in range(0, len(ta), max(1, len(ta) // 4096)))
    if not same or a.eot_ids != b.eot_ids:
        raise InferError(f"{draft.path}: the draft model's vocabulary differs from {target.path}'s "
                         f"({len(tb) if tb is not None else 0} vs {len(ta) if ta is not None else 0} tokens); "
                         f"a draft must share the model's tokenizer")
    if draft.config.n_vocab < target.config.n_vocab and draft.config.n_vocab != len(tb):
        raise InferError(f"{draft.path}: the draft model's output has {draft.config.n_vocab} tokens, "
                         f"{target.path}'s {target.config.n_vocab}")


def _boundaries():
    from .kernels.blockir import _SPANS
    from .kernels.simd import MAXT
    return sorted({b for _, b, _ in _SPANS} | {MAXT * i for i in range(1, 5)})


def pass_fit(k: int, kmax: int) -> int:
    """The draft length to use for a wanted k: the int8 prompt kernels run a group's tokens in
    spans of 2, 2 and 4 (blockir._SPANS) and groups of MAXT (8), so a pass of k + 1 tokens costs as
    much as one filling its last span: k grows to that (a lookup's drafts cost nothing more),
    within kmax; past the last boundary within kmax + 1 it shrinks to it (a pass of 9 tokens
    costs what 16 do)."""
    ok = [b for b in _boundaries() if b <= kmax + 1]
    up = [b for b in ok if b >= k + 1]
    return (up[0] if up else ok[-1]) - 1 if ok else min(k, kmax)


def fit_down(k: int) -> int:
    """A draft model's length k, cut to the last span boundary at or below k + 1 (its drafts cost
    a step each: no padding up, but no pass that opens a span for one token either)."""
    return max(1, max(b for b in _boundaries() if b <= k + 1) - 1) if k >= 1 else k


class _Pace:
    """Draft length and on/off from what rounds cost: time per produced token of speculative
    rounds against plain decode steps (exponential averages)."""

    def __init__(self, draft_max, adaptive):
        self.k = min(4, draft_max) if adaptive else draft_max
        self.kmax, self.adaptive = draft_max, adaptive
        self.t_plain = None
        self.n_plain = 0
        self.t_spec = None
        self.s_t = self.s_n = 0.0
        self.off = 0
        self.backoff = OFF_TOKENS

    def plain(self, dt):
        # the first step after a prompt may still load kernels: the average starts at the second
        self.n_plain += 1
        if self.n_plain >= 2:
            self.t_plain = dt if self.t_plain is None else 0.7 * self.t_plain + 0.3 * dt
        self.off = max(0, self.off - 1)

    def want(self):
        return self.off == 0 and (self.t_plain is not None or not self.adaptive)

    def round(self, n_drafted, n_accepted, dt):
        if not self.adaptive:
            return
        self.k = min(self.kmax, self.k + 2) if n_accepted == n_drafted else max(1, n_accepted + 1)
        # time per produced token over the recent rounds (decaying sums: one unlucky round among
        # good ones does not turn speculation off)
        self.s_t = dt + 0.7 * self.s_t
        self.s_n = n_accepted + 1 + 0.7 * self.s_n
        self.t_spec = self.s_t / self.s_n
        if self.t_plain is not None and self.t_spec > self.t_plain:
            # off for a while, longer each time in a row (a text where drafts keep failing pays
            # for a probe every OFF_MAX tokens, not every OFF_TOKENS)
            self.off, self.t_spec, self.s_t, self.s_n = self.backoff, None, 0.0, 0.0
            self.backoff = min(OFF_MAX, 2 * self.backoff)
        elif n_accepted:
            self.backoff = OFF_TOKENS


def speculative_tokens(engine, prompt, sampler, max_tokens, stop_ids, stats, drafters=(), cfg=None):
    """The decode loop (generate_tokens is this without drafters): yields (token, finish_reason)
    pairs. With drafters, drafts are checked in batches: the same tokens for greedy decoding (up to
    the rounding of a batched pass against a decode step), the same distribution when sampling."""
    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    logits = engine.prefill(prompt)
    stats.cached_tokens = engine.cached
    stats.prefill_tokens = len(prompt) - engine.cached
    stats.prefill_s = time.perf_counter() - t0
    history = list(prompt)
    pace = _Pace(cfg.draft_max, cfg.adaptive) if drafters else None
    n = 0
    t_dec = time.perf_counter()
    pending = None          # a token already drawn (a rejected draft's replacement)
    while True:
        tok = pending if pending is not None else sampler(logits, history)
        pending = None
        n += 1
        stats.generated_tokens = n
        if n == 1:
            stats.ttft_s = time.perf_counter() - t0
            t_dec = time.perf_counter()
        reason = finish_reason(engine, tok, n, max_tokens, stop_ids)
        yield tok, reason
        if reason is not None:
            return
        history.append(tok)
        drafts = []
        if not drafters:
            logits = engine.decode(tok)
            stats.decode_s = time.perf_counter() - t_dec
            continue
        k = min(pace.k, max_tokens - n)
        if engine.policy == "stop":
            k = min(k, engine.n_ctx - engine.kv.offset - 1)
        if k > 0 and pace.want():
            room = engine.n_ctx - engine.kv.offset - 1 if engine.policy == "stop" else max_tokens
            drafts = propose(drafters, history, k, cfg.draft_max, min(max_tokens - n, room))
        if not drafts:
            ts = time.perf_counter()
            logits = engine.decode(tok)
            pace.plain(time.perf_counter() - ts)
            stats.decode_s = time.perf_counter() - t_dec
            continue
        ts = time.perf_counter()
        lg = engine.verify([tok] + drafts)
        accepted, pending = accept(sampler, lg, history, drafts, stop_ids)
        m = len(accepted)
        engine.rollback(len(drafts) - m)
        pace.round(len(drafts), m, time.perf_counter() - ts)
        stats.drafted_tokens += len(drafts)
        stats.accepted_tokens += m
        if pending is None and m == len(drafts):
            logits = lg[m]
        # the accepted drafts are generated tokens: the same checks as any
        # (the cache may hold a token past a finish: engine.tokens says what it holds)
        for d in accepted:
            n += 1
            stats.generated_tokens = n
            reason = finish_reason(engine, d, n, max_tokens, stop_ids)
            yield d, reason
            if reason is not None:
                return
            history.append(d)
        stats.decode_s = time.perf_counter() - t_dec


def propose(drafters, hist, k, draft_max, limit):
    """The first drafter's drafts for the text hist: a lookup's are free, as many as the pass
    holds (pass_fit); a draft model's cost a decode step of its own each (fit_down); at most
    limit tokens."""
    for d in drafters:
        kd = pass_fit(k, draft_max) if isinstance(d, LookupDrafter) else fit_down(k)
        drafts = d.propose(hist, min(kd, limit))
        if drafts:
            return drafts
    return []


def accept(sampler, lg, history, drafts, stop_ids):
    """(accepted drafts, the model's replacement token or None): drafts checked in order against
    the verify pass's logits lg (row i: the position of drafts[i]); an accepted stop token ends it."""
    accepted = []
    for i, d in enumerate(drafts):
        got = _check(sampler, lg[i], history + accepted, d)
        if got is not None:
            return accepted, got
        accepted.append(d)
        if d in stop_ids:
            break
    return accepted, None


def _check(sampler, logits, history, d):
    """None if draft token d is accepted at this position, else the token to emit instead."""
    dist = sampler.dist(logits, history)
    if isinstance(dist, int):
        return None if dist == d else dist
    idx, pr = dist
    hit = np.nonzero(idx == d)[0]
    p_d = float(pr[hit[0]]) if len(hit) else 0.0
    if p_d > 0 and sampler.rng.random() < p_d:
        return None
    if len(hit):        # the residual: p without d, renormalised
        pr = pr.copy()
        pr[hit[0]] = 0.0
        s = pr.sum()
        if s <= 0:
            return d
        pr /= s
    return int(idx[sampler.rng.choice(len(pr), p=pr)])
