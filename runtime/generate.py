"""Generation as thin layers: prefill (with prefix reuse) -> decode steps -> text chunks.

`Engine` owns one context: model, KV cache, scratch buffers and the tokens held in the cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextError
from .kv_cache import KVCache
from .sampling import Sampler


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0        # reused from the cache (common prefix with the previous run)
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0           # request start to first generated token
    generated_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill's logits; decode steps make the others
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class Chunk:
    text: str                     # new text since the previous chunk (may be "")
    token: int | None             # the token sampled at this step (None on the final chunk)
    finish_reason: str | None = None   # "stop", "length", "context" on the last chunk
    stats: Stats | None = None


class Engine:
    def __init__(self, model, n_ctx: int, n_batch: int, n_threads: int, int8_activations: bool = True):
        self.model = model
        self.cfg = model.cfg
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.kv = KVCache(self.cfg, n_ctx)
        self.scratch = model.new_scratch(n_batch, n_ctx, n_threads, int8_activations)
        self.tokens: list[int] = []           # tokens whose K/V are in the cache, in order

    def reset(self):
        self.kv.reset()
        self.tokens = []

    def prefill(self, tokens, all_logits=False, reuse=True):
        """Bring the cache to hold `tokens`; returns logits of the last token (or of all newly
        processed tokens when all_logits). Reuses the longest common prefix already cached."""
        n = len(tokens)
        if n == 0:
            raise ContextError("empty prompt: nothing to run")
        if n > self.n_ctx:
            raise ContextError(f"prompt of {n} tokens is longer than the context ({self.n_ctx} tokens)")
        keep = 0
        if reuse and not all_logits:
            m = min(len(self.tokens), n - 1)
            while keep < m and self.tokens[keep] == tokens[keep]:
                keep += 1
        self.kv.trim(keep)
        del self.tokens[keep:]
        out, logits = [], None
        for i in range(keep, n, self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            logits = self.model.prefill(self.scratch, self.kv, chunk, all_logits=all_logits)
            self.tokens.extend(int(t) for t in chunk)
            if all_logits:
                out.append(logits)
        self.cached = keep
        return np.concatenate(out) if all_logits else logits

    def decode(self, token: int):
        if self.kv.offset >= self.n_ctx:
            raise ContextError(f"context full ({self.n_ctx} tokens)")
        logits = self.model.decode(self.scratch, self.kv, token)
        self.tokens.append(int(token))
        return logits


def generate_tokens(engine: Engine, prompt: list[int], sampler: Sampler, max_tokens: int,
                    stop_ids: frozenset, stats: Stats):
    """Yields (token, finish_reason) pairs: every sampled token, finish_reason set on the last.
    The final token of a "stop" finish is the end-of-generation token itself."""
    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    logits = engine.prefill(prompt)
    stats.cached_tokens = engine.cached
    stats.prefill_tokens = len(prompt) - engine.cached
    stats.prefill_s = time.perf_counter() - t0
    history = list(prompt)
    n = 0
    t_dec = time.perf_counter()
    while True:
        tok = sampler(logits, history)
        n += 1
        stats.generated_tokens = n
        if n == 1:
            stats.ttft_s = time.perf_counter() - t0
            t_dec = time.perf_counter()
        if tok in stop_ids:
            yield tok, "stop"
            return
        if n >= max_tokens:
            yield tok, "length"
            return
        if engine.kv.offset >= engine.n_ctx:
            yield tok, "context"
            return
        yield tok, None
        history.append(tok)
        logits = engine.decode(tok)
        stats.decode_s = time.perf_counter() - t_dec
