"""Sampling: one SamplingParams, a sampler chain as plain functions, a seeded generator.

Chain order (llama.cpp's default): repeat penalty -> top-k -> top-p -> min-p -> temperature ->
draw. temperature <= 0 is greedy (argmax after the penalty). The probability cut-offs work on the
softmax at temperature 1, as llama.cpp's do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import InferError, NumericError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0: off
    top_p: float = 0.95        # 1.0: off
    min_p: float = 0.05        # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 \
                or self.repeat_penalty <= 0 or self.repeat_last_n < 0:
            raise InferError(f"invalid sampling parameters: {self}")

    def replace(self, **kw) -> "SamplingParams":
        return replace(self, **kw)

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)


def apply_repeat_penalty(logits, recent, penalty):
    """llama.cpp's penalty: for each distinct recent token, divide a positive logit by the penalty,
    multiply a negative one (in place)."""
    if penalty == 1.0 or len(recent) == 0:
        return
    ids = np.unique(np.asarray(recent, np.int64))
    v = logits[ids]
    logits[ids] = np.where(v > 0, v / penalty, v * penalty)


class Sampler:
    """Stateful sampler: owns the RNG, so the same seed gives the same text."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator | None = None):
        """params.seed set: a generator of its own, seeded with it; else `rng` (a session's shared
        generator) or a freshly seeded one."""
        self.params = params
        if params.seed is not None or rng is None:
            rng = np.random.default_rng(params.seed)
        self.rng = rng

    def __call__(self, logits: np.ndarray, history) -> int:
        d = self.dist(logits, history)
        if isinstance(d, int):
            return d
        idx, pr = d
        return int(idx[self.rng.choice(len(pr), p=pr)])

    def dist(self, logits: np.ndarray, history):
        """What this sampler draws from for `logits` after `history`: the token itself (int) when
        greedy, else (token ids, their probabilities) after penalties, top-k, top-p, min-p and
        temperature (speculative decoding's acceptance rule needs them)."""
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0:
            logits = logits.copy()
            apply_repeat_penalty(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        n = logits.shape[0]
        if 0 < p.top_k < n:
            idx = np.argpartition(logits, n - p.top_k)[n - p.top_k:]
        else:
            idx = np.arange(n)
        lg = logits[idx].astype(np.float64)
        if not np.isfinite(lg).all():
            raise NumericError("the model computed non-finite logits (NaN or inf): its weights hold NaN/inf "
                               "or its activations overflow")
        order = np.argsort(-lg, kind="stable")
        idx, lg = idx[order], lg[order]
        pr = np.exp(lg - lg[0])
        pr /= pr.sum()
        keep = len(pr)
        if p.top_p < 1.0:
            cum = np.cumsum(pr)
            keep = min(keep, int(np.searchsorted(cum, p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(pr >= p.min_p * pr[0]))))
        lg = lg[:keep] / p.temperature
        pr = np.exp(lg - lg[0])
        pr /= pr.sum()
        return idx[:keep], pr

    def get_state(self) -> dict:
        return {"params": self.params.__dict__.copy(), "rng": self.rng.bit_generator.state}

    def set_state(self, st: dict):
        self.rng.bit_generator.state = st["rng"]
