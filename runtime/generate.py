"""Generation as thin layers: prefill (with prefix reuse) -> decode steps -> text chunks.

`Engine` owns one context: model, KV cache, scratch buffers and the tokens held in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ContextError
from .kv_cache import KVCache, RingKVCache
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
    drafted_tokens: int = 0       # speculative decoding: tokens proposed, and of those accepted
    accepted_tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

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


POLICIES = ("stop", "shift")


class TextOut:
    """Sampled tokens -> text deltas: streaming detokenization (never half a UTF-8 character) and
    stop strings (text that may be the start of one is held back until it cannot be)."""

    def __init__(self, tokenizer, stop=()):
        from .tokenizer import StreamingDetokenizer
        self.detok = StreamingDetokenizer(tokenizer, skip_special=True)
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.held = ""

    def add(self, tok: int, reason: str | None) -> tuple[str, bool]:
        """The text to emit for token `tok` (`reason` set: the last token; "stop" means an end of
        generation token, which adds no text), and whether a stop string ended the text there."""
        text = "" if reason == "stop" else self.detok.add(tok)
        if reason is not None:
            text += self.detok.flush()
        if not self.stop:
            return text, False
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.held = self.held[:cut], ""
            return text, True
        if reason is None:
            safe = max(0, len(self.held) - (self.max_stop - 1))
            text, self.held = self.held[:safe], self.held[safe:]
        else:
            text, self.held = self.held, ""
        return text, False


class Engine:
    """One context. `policy` says what happens when it is full: "stop" (a linear KVCache; generation
    ends with finish_reason "context", a longer prompt is refused) or "shift" (a RingKVCache that
    keeps the first `n_keep` tokens and a sliding window of the most recent ones; prompts and
    generations of any length). `tokens` is everything run through the context, in order (under
    "shift" more than the cache holds)."""

    def __init__(self, model, n_ctx: int, n_batch: int, n_threads: int, policy: str = "stop",
                 n_keep: int = 4, int8_activations: bool = True):
        if policy not in POLICIES:
            raise ContextError(f"context policy must be one of {', '.join(POLICIES)} (got {policy!r})")
        self.model = model
        self.cfg = model.cfg
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.policy = policy
        model.use_context(n_ctx)          # what depends on the context size (LongRoPE's factors)
        if policy == "shift":
            self.kv = RingKVCache(self.cfg, n_ctx, n_keep, getattr(model, "inv_freq", None),
                                  getattr(model, "rope_mode", None))
            # a prompt run into a full ring evicts this many tokens per chunk, so each of its tokens
            # sees at least 7/8 of the window (llama.cpp's context shift drops half)
            self.shift_block = max(1, min(n_batch, self.kv.window // 8))
        else:
            self.kv = KVCache(self.cfg, n_ctx)
        self.n_keep = n_keep if policy == "shift" else 0
        self.scratch = model.new_scratch(n_batch, n_ctx, n_threads, int8_activations)
        self.tokens: list[int] = []           # tokens run through the cache, in order
        self.cached = 0

    @property
    def full(self) -> bool:
        """No room for another token under the "stop" policy (a ring is never full)."""
        return self.policy == "stop" and self.kv.offset >= self.n_ctx

    def reset(self):
        self.kv.reset()
        self.tokens = []

    def chunk_len(self) -> int:
        """Tokens the next prefill chunk may hold: n_batch, or under "shift" the free slots, or when
        the ring is full `shift_block` (evicted before the chunk runs)."""
        if self.policy == "shift":
            room = self.kv.room
            return min(self.n_batch, room if room > 0 else self.shift_block)
        return self.n_batch

    def prefill(self, tokens, all_logits=False, reuse=True):
        """Bring the context to hold `tokens`; returns logits of the last token (or of all newly
        processed tokens when all_logits). Reuses the longest common prefix already cached."""
        n = len(tokens)
        if n == 0:
            raise ContextError("empty prompt: nothing to run")
        if n > self.n_ctx and (self.policy == "stop" or all_logits):
            raise ContextError(f"prompt of {n} tokens is longer than the context ({self.n_ctx} tokens)")
        keep = 0
        if reuse and not all_logits:
            m = min(len(self.tokens), n - 1)
            while keep < m and self.tokens[keep] == tokens[keep]:
                keep += 1
        try:
            keep = self.kv.trim(keep)
            del self.tokens[keep:]
            out, logits = [], None
            i = keep
            while i < n:
                chunk = tokens[i:i + self.chunk_len()]
                logits = self.model.prefill(self.scratch, self.kv, chunk, all_logits=all_logits)
                self.tokens.extend(int(t) for t in chunk)
                i += len(chunk)
                if all_logits:
                    out.append(logits)
        except BaseException:
            self.reset()          # interrupted half-way: what the cache holds is unknown
            raise
        self.cached = keep
        return np.concatenate(out) if all_logits else logits

    def decode(self, token: int):
        if self.full:
            raise ContextError(f"context full ({self.n_ctx} tokens)")
        try:
            logits = self.model.decode(self.scratch, self.kv, token)
            self.tokens.append(int(token))
        except BaseException:
            self.reset()
            raise
        return logits

    def verify(self, tokens):
        """Run `tokens` after what the context holds and return the logits of every one of them
        (len(tokens), n_vocab): speculative decoding's check of drafted tokens in one pass."""
        out, i = [], 0
        try:
            while i < len(tokens):
                chunk = tokens[i:i + self.chunk_len()]
                out.append(self.model.prefill(self.scratch, self.kv, chunk, all_logits=True))
                self.tokens.extend(int(t) for t in chunk)
                i += len(chunk)
        except BaseException:
            self.reset()
            raise
        return np.concatenate(out) if len(out) > 1 else out[0]

    def rollback(self, n: int):
        """Forget the newest n tokens (rejected drafts). A ring that evicted what it would need
        (it cannot here: the drafts are its newest tokens) refills from the tokens it holds."""
        if n <= 0:
            return
        keep = len(self.tokens) - n
        kept = self.kv.trim(keep)
        if kept < keep:
            toks = self.tokens[:keep]
            del self.tokens[kept:]
            self.prefill(toks)
        else:
            del self.tokens[keep:]

    # --- sessions -------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict, dict]:
        meta, arrays = self.kv.get_state()
        meta["policy"] = self.policy
        arrays["tokens"] = np.asarray(self.tokens, np.int64)
        return meta, arrays

    def set_state(self, meta: dict, arrays: dict):
        """Load a state from get_state; raises StateError (leaving this context unchanged) when it
        does not fit or is inconsistent."""
        from .errors import StateError
        tokens = arrays["tokens"]
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or len(tokens) != int(meta["pos"]):
            raise StateError(f"{len(tokens)} tokens for {meta['pos']} positions")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab):
            raise StateError("token id out of range")
        self.kv.set_state(meta, arrays)
        self.tokens = [int(t) for t in tokens]
        self.cached = 0


def finish_reason(engine: Engine, tok: int, n: int, max_tokens: int, stop_ids: frozenset):
    """Why generation ends at the n-th token `tok` ("stop", "length", "context"), or None."""
    if tok in stop_ids:
        return "stop"
    if n >= max_tokens:
        return "length"
    if engine.full:
        return "context"
    return None


def generate_tokens(engine: Engine, prompt: list[int], sampler: Sampler, max_tokens: int,
                    stop_ids: frozenset, stats: Stats):
    """Yields (token, finish_reason) pairs: every sampled token, finish_reason set on the last.
    The final token of a "stop" finish is the end-of-generation token itself."""
    from .speculative import speculative_tokens          # the one decode loop (no drafters: plain)
    yield from speculative_tokens(engine, prompt, sampler, max_tokens, stop_ids, stats)
