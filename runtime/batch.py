"""The multi-sequence engine: several requests at once on one model.

`BatchEngine(llm, parallel=N)` runs up to N sequences. Each step decodes every active sequence in
one pass over the weights (LlamaModel.decode_batch: the prompt kernels read a weight block once
for all the step's tokens), and between steps runs one prompt chunk of a newly admitted sequence
(so running streams keep flowing while a long prompt is read). A sequence whose request ends or
is cancelled leaves at the next step.

KV memory is one KVPool: N sequences of n_ctx // N slots each (the context of one sequence; as
llama-server splits -c among its slots), each sequence owning its positions, with context shift
per sequence under policy "shift". Prefix cache: a slot keeps the tokens of its last request, and
a new request goes to the free slot sharing the longest prefix with its prompt; a slot's cached
prefix about to be overwritten is copied to an LRU store (within `prefix_cache_mb`), from which a
later request sharing it is restored. Either way only the rest of the prompt is prefilled.

Requests come from any thread (`submit`, `stream`, `generate`) or an asyncio loop (`astream`);
the model runs on the engine's own thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from .errors import ContextError, InferError
from .generate import POLICIES, Chunk, Stats, TextOut
from .kv_cache import KVPool
from .sampling import Sampler, SamplingParams

log = logging.getLogger("infer")

MIN_SAVED_PREFIX = 16        # cached prefixes shorter than this are not worth a copy in the store


class QueueFullError(InferError):
    """The engine's queue of waiting requests is full (a server answers 503)."""


@dataclass
class Request:
    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    on_chunk: Callable[[Chunk], None]          # called on the engine thread, for every chunk
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    stats: Stats = field(default_factory=Stats)

    def cancel(self):
        """Stop generating (a client went away): the sequence leaves at the next step."""
        self.cancelled = True


class _Slot:
    def __init__(self, idx, kv):
        self.idx = idx
        self.kv = kv
        self.tokens: list[int] = []       # tokens whose keys and values the cache holds, in order
        self.req: Request | None = None
        self.last_used = 0.0

    def reset(self):
        self.kv.reset()
        self.tokens = []

    def start(self, req: Request, keep: int, tokenizer):
        self.req = req
        self.todo = req.ids[keep:]          # prompt tokens still to prefill
        self.sampler = Sampler(req.sampling)
        self.out = TextOut(tokenizer, req.stop)
        self.history = list(req.ids)
        self.next_tok = None                # sampled, not yet run through the model
        self.n_gen = 0
        req.stats.prompt_tokens = len(req.ids)
        req.stats.cached_tokens = keep
        req.stats.prefill_tokens = len(req.ids) - keep


def _ema(old: float | None, new: float, w: float = 0.2) -> float:
    return new if old is None else old + w * (new - old)


def _common(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    """Copies of cached prefixes' keys and values, least recently used evicted first within
    `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0

    def best(self, ids) -> tuple[int, tuple | None]:
        best, key = 0, None
        for k in self.entries:
            n = _common(k, ids)
            if n > best:
                best, key = n, k
        return best, key

    def put(self, tokens, kv):
        n = len(tokens)
        key = tuple(tokens)
        size = 2 * kv.k[:, :, :n].nbytes
        if size > self.budget or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        # an entry that is a prefix of this one is superseded by it
        for k in [k for k in self.entries if len(k) <= n and key[:len(k)] == k]:
            self._drop(k)
        while self.nbytes + size > self.budget and self.entries:
            self._drop(next(iter(self.entries)))
        self.entries[key] = (kv.k[:, :, :n].copy(), kv.v[:, :, :n].copy())
        self.nbytes += size

    def _drop(self, k):
        a, b = self.entries.pop(k)
        self.nbytes -= a.nbytes + b.nbytes

    def restore(self, key, n, kv):
        """Load the first n tokens of entry `key` into the (linear, empty) cache kv."""
        k, v = self.entries[key]
        self.entries.move_to_end(key)
        kv.reset()
        kv.slots_for(n)
        kv.k[:, :, :n] = k[:, :, :n]
        kv.v[:, :, :n] = v[:, :, :n]
        self.hits += 1


@dataclass
class EngineMetrics:
    requests: int = 0
    finished: dict = field(default_factory=dict)        # finish_reason -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    batch_rows: int = 0
    ttft: list = field(default_factory=list)             # seconds, the last 10000
    tps: list = field(default_factory=list)              # decode tokens/s per request
    drafted: int = 0                                     # speculative decoding (a lone sequence)
    accepted: int = 0


class BatchEngine:
    """Up to `parallel` generations at once on the model of `llm` (an infer.LLM: its weights,
    tokenizer and chat template are shared; its own single-sequence context is not used).

    >>> eng = infer.BatchEngine(llm, parallel=4)
    >>> for chunk in eng.stream("Once upon a time", max_tokens=32): ...
    >>> async for chunk in eng.astream(ids, max_tokens=32): ...
    """

    def __init__(self, llm, parallel: int = 4, n_ctx: int | None = None, policy: str = "stop",
                 n_keep: int = 4, chunk: int = 256, prefix_cache_mb: float = 256, max_queue: int = 64,
                 int8_activations: bool | None = None, batch_invariant: bool = False, speculative=None):
        """n_ctx: tokens of KV for all sequences together (default llm.n_ctx * parallel), split
        evenly: each sequence's context is n_ctx // parallel. chunk: prompt tokens run between two
        decode steps. max_queue: waiting requests beyond it are refused (QueueFullError).
        int8_activations: default, as llm was opened. batch_invariant: every step runs the batched
        kernels, a lone sequence too, so a sequence's tokens do not depend on what else runs (to
        the bit on int8 activations); by default a lone sequence runs the fused one-token step,
        LLM.generate's (~1.7x faster on SmolLM2), and so do a few sequences where one fused step
        each measured faster than a batched pass (on a token-lane CPU a pass of 1..8 rows costs
        the same: the 1.1B's 2 threads, 26 ms fused, 101-121 ms batched), whose rounding differs
        from the batched step's, so a greedy text may differ from its text under load where two
        tokens nearly tie.
        speculative: a SpeculativeConfig (default: llm's own, if it was opened with draft= or
        lookup=): while one sequence runs alone its tokens are drafted and checked in one pass, as
        LLM.generate does (same text); with several, the batched step serves them all."""
        if policy not in POLICIES:
            raise ContextError(f"context policy must be one of {', '.join(POLICIES)} (got {policy!r})")
        if parallel < 1:
            raise InferError(f"parallel must be >= 1 (got {parallel})")
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.parallel = int(parallel)
        total = int(n_ctx or llm.n_ctx * parallel)
        self.seq_ctx = total // self.parallel
        if self.seq_ctx < 8:
            raise ContextError(f"a context of {total} tokens for {parallel} sequences leaves "
                               f"{self.seq_ctx} tokens each (at least 8 needed)")
        self.policy = policy
        self.fused_single = not batch_invariant
        self.n_threads = llm.n_threads
        m = self.model
        self.pool = KVPool(m.cfg, self.parallel, self.seq_ctx)
        self.slots = [_Slot(i, self.pool.cache(i, policy, n_keep, getattr(m, "inv_freq", None),
                                               getattr(m, "rope_mode", None)))
                      for i in range(self.parallel)]
        self.chunk = max(1, min(int(chunk), self.seq_ctx))
        if policy == "shift":
            self.chunk = min(self.chunk, max(1, self.slots[0].kv.window // 8))
        if int8_activations is None:
            int8_activations = llm.engine.scratch.use_i8
        self.scratch = m.new_scratch(max(self.chunk, self.parallel), self.seq_ctx, self.n_threads,
                                     int8_activations)
        self.logits = np.zeros((self.parallel, m.cfg.n_vocab), np.float32)
        self.store = PrefixStore(int(prefix_cache_mb * 2 ** 20))
        self.max_queue = int(max_queue)
        self.stop_ids = frozenset(self.tokenizer.eot_ids)
        self.metrics = EngineMetrics()
        self._queue: list[Request] = []
        self._cv = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._prefill_turn = 0
        self._t_fused: float | None = None      # seconds of a fused one-token step (moving average)
        self._t_batch: dict[int, float] = {}    # rows -> seconds of a batched step
        self._fused_run: dict[int, int] = {}    # rows -> fused steps chosen since the last batched one
        self.spec, self.drafters, self._own_drafters = None, [], False
        if speculative is not None:
            from .speculative import open_drafters
            self.drafters = open_drafters(speculative, llm)
            self.spec, self._own_drafters = speculative, True
        elif getattr(llm, "speculative", None) is not None:
            self.spec, self.drafters = llm.speculative, llm._drafters
        self._thread = threading.Thread(target=self._run, name="infer-batch", daemon=True)
        self._thread.start()

    # --- public ---------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return self.pool.nbytes

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.req is not None)

    def prompt_ids(self, prompt, add_bos=None, special=False) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_bos=add_bos, special=special) if isinstance(prompt, str) \
            else [int(t) for t in prompt]
        if not ids:
            raise ContextError("empty prompt: nothing to run")
        n_vocab = self.model.cfg.n_vocab
        if any(t < 0 or t >= n_vocab for t in ids):
            raise ContextError(f"token id out of range (the vocabulary has {n_vocab} tokens)")
        if self.policy == "stop" and len(ids) >= self.seq_ctx:
            raise ContextError(f"prompt of {len(ids)} tokens does not fit the context of {self.seq_ctx} "
                               f"tokens per sequence ({self.parallel} sequences)")
        return ids

    def submit(self, prompt, on_chunk: Callable[[Chunk], None], max_tokens: int = 256,
               sampling: SamplingParams | None = None, stop: list[str] | None = None) -> Request:
        """Queue a generation; on_chunk gets its Chunks on the engine thread (the last has
        finish_reason "stop", "length", "context" or "cancelled", and the stats)."""
        if max_tokens < 1:
            raise InferError(f"max_tokens must be >= 1 (got {max_tokens})")
        req = Request(self.prompt_ids(prompt), int(max_tokens), sampling or SamplingParams(), list(stop or []),
                      on_chunk)
        with self._cv:
            if self._closing:
                raise InferError("the engine is shut down")
            if self._error is not None:
                raise InferError(f"the engine stopped: {self._error}")
            # requests beyond the free slots wait; at most max_queue of them
            if len(self._queue) - (self.parallel - self.active) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting (the queue holds {self.max_queue})")
            self._queue.append(req)
            self.metrics.requests += 1
            self._cv.notify()
        return req

    def stream(self, prompt, max_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: list[str] | None = None) -> Iterator[Chunk]:
        """Like LLM.stream, from any thread; closing the iterator cancels the request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt, q.put, max_tokens, sampling, stop)
        try:
            while True:
                c = q.get()
                if isinstance(c, BaseException):
                    raise c
                yield c
                if c.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def generate(self, prompt, max_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: list[str] | None = None):
        from .api import Completion
        parts, toks, c = [], [], None
        for c in self.stream(prompt, max_tokens, sampling, stop):
            parts.append(c.text)
            if c.token is not None:
                toks.append(c.token)
        return Completion("".join(parts), toks, c.finish_reason, c.stats)

    async def astream(self, prompt, max_tokens: int = 256, sampling: SamplingParams | None = None,
                      stop: list[str] | None = None) -> AsyncIterator[Chunk]:
        """Chunks as an asyncio iterator (a GUI or server event loop awaits them; the model runs
        on the engine thread). Leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self.submit(prompt, lambda c: loop.call_soon_threadsafe(q.put_nowait, c), max_tokens, sampling, stop)
        try:
            while True:
                c = await q.get()
                if isinstance(c, BaseException):
                    raise c
                yield c
                if c.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def chat_ids(self, messages) -> list[int]:
        return self.llm.chat_tokens(messages)

    def close(self, timeout: float = 10.0):
        """Cancel what runs and waits, and stop the engine thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._own_drafters:
            for d in self.drafters:
                d.close()
            self.drafters = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self):
        import numba
        numba.set_num_threads(max(1, min(self.n_threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(self.scratch.blas_threads, user_api="blas")
        except ImportError:  # pragma: no cover
            pass
        try:
            while True:
                with self._cv:
                    while not self._closing and not self._queue and not any(s.req for s in self.slots):
                        self._cv.wait()
                    if self._closing:
                        break
                self._step()
        except BaseException as e:      # a bug or a numeric error: every request gets it
            log.exception("batch engine failed")
            self._error = e
        finally:
            err = self._error or InferError("the engine was shut down")
            with self._cv:
                waiting, self._queue = self._queue, []
            for s in self.slots:
                if s.req is not None:
                    self._finish(s, "cancelled", err)
            for r in waiting:
                r.done = True
                self._emit(r, Chunk("", None, "cancelled", r.stats))

    def _admit(self):
        with self._cv:
            free = [s for s in self.slots if s.req is None]
            while free and self._queue:
                req = self._queue.pop(0)
                slot = self._place(req, free)
                free.remove(slot)

    def _place(self, req: Request, free: list[_Slot]) -> _Slot:
        """Pick a free slot for req (the longest common prefix with what it holds, else the least
        recently used) and bring its cache to the best prefix available."""
        ids = req.ids
        lim = len(ids) - 1                   # at least one token to run: its logits start the reply
        best = max(free, key=lambda s: (min(_common(s.tokens, ids), lim), -s.last_used))
        if _common(best.tokens, ids) == 0:
            best = min(free, key=lambda s: s.last_used)
        keep = min(_common(best.tokens, ids), lim)
        ring_wrapped = getattr(best.kv, "wrapped", False)
        if ring_wrapped:
            keep = 0
        if len(best.tokens) - keep >= MIN_SAVED_PREFIX and not ring_wrapped:
            self.store.put(best.tokens, best.kv)      # what the slot held beyond the common part
        n_store, key = self.store.best(ids)
        n_store = min(n_store, lim)
        if key is not None and n_store > keep:
            self.store.restore(key, n_store, best.kv)
            best.tokens = list(ids[:n_store])
            keep = n_store
        else:
            keep = best.kv.trim(keep) if keep else 0
            if keep == 0:
                best.kv.reset()
            del best.tokens[keep:]
        best.start(req, keep, self.tokenizer)
        if self.spec is not None:
            from .speculative import _Pace
            best.pace = _Pace(self.spec.draft_max, self.spec.adaptive)
        return best

    def _step(self):
        self._admit()
        for s in self.slots:
            if s.req is not None and s.req.cancelled:
                self._finish(s, "cancelled")
        # one prompt chunk, the sequences waiting for one in turn
        pre = [s for s in self.slots if s.req is not None and s.todo]
        if pre:
            s = pre[self._prefill_turn % len(pre)]
            self._prefill_turn += 1
            self._prefill_chunk(s)
        dec = [s for s in self.slots if s.req is not None and not s.todo and s.next_tok is not None]
        if dec:
            toks = [s.next_tok for s in dec]
            lone = len(dec) == 1 and not pre and not self._queue
            if lone and self.drafters and self._speculate(dec[0]):
                return
            n = len(dec)
            ts = time.perf_counter()
            if n == 1 and self.fused_single:
                # a lone sequence: the fused one-token step (one parallel region a token), as
                # LLM.generate; several: one pass over the weights for all of them
                lg = self.model.decode(self.scratch, dec[0].kv, toks[0]).reshape(1, -1)
                if lone and self.drafters:
                    dec[0].pace.plain(time.perf_counter() - ts)
                self._t_fused = _ema(self._t_fused, time.perf_counter() - ts)
            elif self.fused_single and self._fused_pays(n):
                # a few sequences where one fused step each costs less than a batched pass (on a
                # token-lane CPU a pass costs the same for 1..8 rows: ~4 fused tokens of a 1.1B)
                for i, s in enumerate(dec):
                    self.logits[i] = self.model.decode(self.scratch, s.kv, toks[i])
                lg = self.logits
                self._t_fused = _ema(self._t_fused, (time.perf_counter() - ts) / n)
            else:
                lg = self.model.decode_batch(self.scratch, self.pool, [s.idx for s in dec], [s.kv for s in dec],
                                             toks, self.logits)
                self._t_batch[n] = _ema(self._t_batch.get(n), time.perf_counter() - ts)
            self.metrics.steps += 1
            self.metrics.batch_rows += len(dec)
            for i, s in enumerate(dec):
                s.tokens.append(toks[i])
                s.history.append(toks[i])
                s.next_tok = None
                self._sample(s, lg[i])

    FUSED_RETRY = 256

    def _fused_pays(self, n: int) -> bool:
        """Whether n sequences' step runs faster as n fused one-token steps than as one batched
        pass, by the times this engine measured (a batched pass is tried first for each n, and
        again after FUSED_RETRY fused steps in a row, so that a time measured under another load
        of the machine does not hold forever)."""
        tb = self._t_batch.get(n)
        if self._t_fused is None or tb is None or n * self._t_fused >= tb:
            return False
        run = self._fused_run.get(n, 0) + 1
        self._fused_run[n] = 0 if run >= self.FUSED_RETRY else run
        return run < self.FUSED_RETRY

    def _speculate(self, s: _Slot) -> bool:
        """One speculative round for the lone sequence s: drafts of the text so far run after
        s.next_tok in one pass, the agreeing prefix kept (speculative_tokens' rule, the same text).
        False when there is nothing worth drafting (the caller runs a plain step)."""
        from .speculative import accept, propose
        pace, kv, req = s.pace, s.kv, s.req
        if not pace.want():
            return False
        tok = s.next_tok
        hist = s.history + [tok]
        # room: drafts must fit the context with a token to spare (stop: the accepted ones then never
        # end the text early), or the ring without evicting (shift: a rollback then only moves the
        # write position back), and one pass
        room = (self.seq_ctx - kv.offset - 2) if self.policy == "stop" else kv.room - 1
        k = min(pace.k, req.max_tokens - s.n_gen, room, self.chunk - 1)
        if k <= 0:
            return False
        drafts = propose(self.drafters, hist, k, self.spec.draft_max,
                         min(req.max_tokens - s.n_gen, room, self.chunk - 1))
        if not drafts:
            return False
        ts = time.perf_counter()
        lg = self.model.prefill(self.scratch, kv, [tok] + drafts, all_logits=True)
        accepted, pending = accept(s.sampler, lg, hist, drafts, self.stop_ids)
        m = len(accepted)
        kv.trim(len(s.tokens) + 1 + m)
        pace.round(len(drafts), m, time.perf_counter() - ts)
        st = req.stats
        st.drafted_tokens += len(drafts)
        st.accepted_tokens += m
        self.metrics.steps += 1
        self.metrics.batch_rows += 1
        self.metrics.drafted += len(drafts)
        self.metrics.accepted += m
        s.next_tok = None
        s.tokens.append(tok)
        s.history.append(tok)
        for d in accepted:      # generated tokens already in the cache
            s.tokens.append(d)
            s.history.append(d)
            if not self._take(s, d, cached=True):
                return True
        if pending is not None:
            self._take(s, pending)
        else:
            self._sample(s, lg[m])
        return True

    def _prefill_chunk(self, s: _Slot):
        kv = s.kv
        n = self.chunk
        if self.policy == "shift" and kv.room > 0:
            n = min(n, kv.room)
        chunk, s.todo = s.todo[:n], s.todo[n:]
        t0 = time.perf_counter()
        logits = self.model.prefill(self.scratch, kv, chunk)
        s.tokens.extend(chunk)
        s.req.stats.prefill_s += time.perf_counter() - t0
        if not s.todo:
            s.t_dec = time.perf_counter()
            self._sample(s, logits)

    def _sample(self, s: _Slot, logits):
        self._take(s, s.sampler(logits, s.history))

    def _take(self, s: _Slot, tok: int, cached: bool = False) -> bool:
        """tok is s's next generated token: emit it, or finish; False when s finished. cached:
        tok is already in s's cache (an accepted draft), else it runs at the next step."""
        req = s.req
        s.n_gen += 1
        st = req.stats
        st.generated_tokens = s.n_gen
        if s.n_gen == 1:
            st.ttft_s = time.perf_counter() - req.created
            s.t_dec = time.perf_counter()
        else:
            st.decode_s = time.perf_counter() - s.t_dec
        reason = None
        if tok in self.stop_ids:
            reason = "stop"
        elif s.n_gen >= req.max_tokens:
            reason = "length"
        elif self.policy == "stop" and s.kv.offset >= self.seq_ctx:
            reason = "context"
        text, stopped = s.out.add(tok, reason)
        if stopped:
            reason = "stop"
        if reason is None:
            if not cached:
                s.next_tok = tok
            if not self._emit(req, Chunk(text, tok, None, None)):
                self._finish(s, "cancelled")
                return False
            return True
        self._finish(s, reason, text=text, tok=tok)
        return False

    def _finish(self, s: _Slot, reason: str, err: BaseException | None = None, text: str = "", tok=None):
        req, s.req = s.req, None
        s.next_tok = None
        s.todo = []
        s.last_used = time.perf_counter()
        req.done = True
        m = self.metrics
        st = req.stats
        m.finished[reason] = m.finished.get(reason, 0) + 1
        m.prompt_tokens += st.prompt_tokens
        m.cached_tokens += st.cached_tokens
        m.completion_tokens += st.generated_tokens
        if st.generated_tokens:
            m.ttft.append(st.ttft_s)
            del m.ttft[:-10000]
            if st.decode_tps:
                m.tps.append(st.decode_tps)
                del m.tps[:-10000]
        if err is not None and reason == "cancelled" and not isinstance(err, InferError):
            self._emit(req, InferError(f"generation failed: {err}"))
            return
        self._emit(req, Chunk(text, tok, reason, st))

    @staticmethod
    def _emit(req: Request, item) -> bool:
        """Hand a chunk to the request's callback; one that fails (its event loop closed, say)
        cancels that request, never the engine."""
        try:
            req.on_chunk(item)
            return True
        except Exception:       # noqa: BLE001 - the caller's code
            log.warning("a request's chunk callback failed; cancelling the request", exc_info=True)
            req.cancelled = True
            return False
