"""KV cache: keys (after RoPE) and values of every layer, one slot per token.

Both caches share one layout, so the model code does not care which it writes to:
k, v (n_layers, n_kv_heads, n_slots, head_dim) float32; kpos (n_slots,) int64 the position of the
token held by each slot; `offset` the number of filled slots (attention reads slots 0..offset-1);
`pos` the position of the next token. The model asks `slots_for(n)` (prefill) or `next_slot()`
(decode) where to write; those calls record the positions and advance `offset` and `pos`.

`KVCache(cfg, n_slots)` fills slots in order (pos == offset).

`RingKVCache(cfg, max_size, keep)` pins the first `keep` tokens (the attention sinks) in slots
0..keep-1 and, once full, overwrites the oldest of the others (a sliding window of
max_size - keep tokens in slots keep..max_size-1). RoPE is handled so that attention sees what
llama.cpp's context shift gives (sinks at positions 0..keep-1, the window right after them):
  * window tokens keep their keys rotated at their absolute positions (which grow without bound;
    RoPE angles are computed in float64, so position 10^7 is as exact as position 10): the window
    is contiguous, so its distances to the query are already the logical ones;
  * the sink keys are re-rotated to virtual positions a0-keep .. a0-1, a0 the position of the
    oldest token still in the window, so that their distance to the query is the logical one.
    They are rotated from a copy taken at their original positions (no drift).
A query therefore scores every cached key exactly as after llama.cpp's shift, up to float32
rounding of the rotation.
"""
from __future__ import annotations

import mmap

import numpy as np

from .config import ModelConfig
from .errors import ContextError, StateError


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """Zeroed array whose pages become resident only when written. numpy's zeros would do, but
    with transparent huge pages one written slot per (layer, head) faults in whole 2 MiB pages,
    making the full cache resident at the first token; MADV_NOHUGEPAGE keeps it 4 KiB-grained."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    mm = mmap.mmap(-1, n)
    mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, dtype).reshape(shape)


class KVCache:
    kind = "linear"

    def __init__(self, cfg: ModelConfig, n_slots: int, arrays=None):
        """arrays: (k, v, kpos) to use instead of new ones (a sequence's part of a KVPool)."""
        shape = (cfg.n_layers, cfg.n_kv_heads, n_slots, cfg.head_dim)
        self.cfg = cfg
        if arrays is None:
            arrays = (lazy_zeros(shape), lazy_zeros(shape), np.zeros(n_slots, np.int64))
        self.k, self.v, self.kpos = arrays
        assert self.k.shape == shape and self.v.shape == shape and self.kpos.shape == (n_slots,)
        self.n_slots = n_slots
        self.offset = 0          # filled slots (== next position for a linear cache)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def pos(self) -> int:
        """Position of the next token (tokens held, for a linear cache)."""
        return self.offset

    @property
    def room(self) -> int:
        """Tokens that can be written before anything must be evicted."""
        return self.n_slots - self.offset

    def slots_for(self, n: int) -> np.ndarray:
        """Slots that the next n tokens will be written to; their positions are recorded and the
        cache advanced (attention then reads slots 0..offset-1)."""
        if self.offset + n > self.n_slots:
            raise ContextError(f"KV cache full: {self.offset} + {n} tokens > {self.n_slots} slots")
        s = np.arange(self.offset, self.offset + n)
        self.kpos[s] = s
        self.offset += n
        return s

    def next_slot(self) -> int:
        """The slot of the next single token (decode), its position recorded; allocates nothing."""
        s = self.offset
        if s >= self.n_slots:
            raise ContextError(f"KV cache full ({self.n_slots} slots)")
        self.kpos[s] = s
        self.offset += 1
        return s

    def trim(self, n_keep: int) -> int:
        """Forget every token after the first n_keep (prefix reuse); returns the tokens kept."""
        self.offset = min(self.offset, n_keep)
        return self.offset

    def reset(self):
        self.offset = 0

    # --- sessions -------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict, dict]:
        """(scalars, arrays) describing the filled part of the cache (see set_state)."""
        n = self.offset
        return ({"kind": self.kind, "n_slots": self.n_slots, "offset": n, "pos": self.pos},
                {"k": self.k[:, :, :n], "v": self.v[:, :, :n], "kpos": self.kpos[:n]})

    def set_state(self, meta: dict, arrays: dict):
        """Load what get_state gave (possibly from a cache of another size). Raises StateError (without
        changing anything) when it does not fit or is inconsistent."""
        n, pos = _check_common(self, meta, arrays)
        if meta["kind"] != "linear" and pos != n:
            raise StateError(f"the session's cache has wrapped ({meta['kind']}, {pos} tokens seen in "
                             f"{n} slots); it needs context_policy='shift' with n_ctx {meta['n_slots']}")
        if not np.array_equal(arrays["kpos"], np.arange(n)):
            raise StateError("slot positions are not 0..n-1")
        _copy_kv(self, arrays, n)
        self.offset = n


def _check_common(cache, meta, arrays):
    c = cache.cfg
    n, pos = int(meta["offset"]), int(meta["pos"])
    want = (c.n_layers, c.n_kv_heads, n, c.head_dim)
    for name in ("k", "v"):
        if tuple(arrays[name].shape) != want or arrays[name].dtype != np.float32:
            raise StateError(f"{name} cache has shape {tuple(arrays[name].shape)} {arrays[name].dtype}, "
                             f"expected {want} float32")
    if arrays["kpos"].shape != (n,):
        raise StateError(f"{arrays['kpos'].shape[0]} slot positions for {n} filled slots")
    if not 0 <= n <= pos:
        raise StateError(f"inconsistent counts: {n} filled slots, {pos} tokens")
    if n > cache.n_slots:
        raise StateError(f"the session holds {n} cached tokens; this context has {cache.n_slots} slots "
                         f"(raise n_ctx)")
    return n, pos


def _copy_kv(cache, arrays, n):
    cache.k[:, :, :n] = arrays["k"]
    cache.v[:, :, :n] = arrays["v"]
    cache.kpos[:n] = arrays["kpos"]


class RingKVCache(KVCache):
    """A fixed-size cache that keeps `keep` sink tokens and a sliding window of the most recent
    max_size - keep tokens, with RoPE positions handled as described in the module docstring.

    `inv_freq` and `rope_mode` default to what the config implies (models/llama.py's rope);
    inv_freq may hold a row per layer (models whose sliding-window layers have their own base)."""
    kind = "ring"

    def __init__(self, cfg: ModelConfig, max_size: int, keep: int = 4, inv_freq=None, rope_mode=None,
                 arrays=None):
        from .kernels.ops import ROPE_NEOX, ROPE_NORM, rope_inv_freq
        max_size, keep = int(max_size), int(keep)
        if max_size < 2:
            raise ContextError(f"a ring KV cache needs at least 2 slots (got {max_size})")
        if not 0 <= keep < max_size:
            raise ContextError(f"keep (sink tokens) must be >= 0 and smaller than the context "
                               f"({max_size} tokens), got {keep}")
        super().__init__(cfg, max_size, arrays)
        self.keep = keep
        self.window = max_size - keep
        if inv_freq is None:
            inv_freq = np.zeros(cfg.rope_dim // 2, np.float64)
            rope_inv_freq(cfg.rope_dim, cfg.rope_base, inv_freq)
        self.inv_freq = np.asarray(inv_freq, np.float64)
        self.rope_mode = (ROPE_NEOX if cfg.rope_neox else ROPE_NORM) if rope_mode is None else rope_mode
        L, H, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        self.sink_k = np.zeros((L, H, keep, D), np.float32)       # sink keys at positions 0..keep-1
        self._rot = np.zeros((L * H * keep, D), np.float32)      # scratch for re-rotation
        self._rot_pos = np.zeros(L * H * keep, np.int64)
        self.reset()

    def reset(self):
        self.offset = 0           # filled slots
        self._pos = 0             # position of the next token (tokens seen)
        self.head = 0             # slot the next token goes to
        self.sink_base = 0        # sink i is rotated at position sink_base + i
        self.sink_saved = False   # sink_k holds the sinks' keys (taken at the first eviction)

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def wrapped(self) -> bool:
        """True once a token has been evicted (the cache no longer holds tokens 0..pos-1)."""
        return self._pos > self.offset

    @property
    def room(self) -> int:
        return self.n_slots - self.offset

    @property
    def oldest(self) -> int:
        """Position of the oldest token of the window (== keep before anything was evicted)."""
        return self._pos - (self.offset - self.keep) if self.offset >= self.keep else self.keep

    def _take(self) -> int:
        s = self.head
        if self.offset < self.n_slots:
            self.offset += 1
        elif not self.sink_saved:                 # first eviction: the sinks are still at 0..keep-1
            self.sink_k[...] = self.k[:, :, :self.keep]
            self.sink_saved = True
        self.head = s + 1 if s + 1 < self.n_slots else self.keep
        self.kpos[s] = self._pos
        self._pos += 1
        return s

    def _sync_sinks(self):
        base = self.oldest - self.keep
        if base == self.sink_base or self.keep == 0:
            return
        from .kernels.ops import rope
        c = self.cfg
        L, H, K, D = c.n_layers, c.n_kv_heads, self.keep, c.head_dim
        self._rot[...] = self.sink_k.reshape(L * H * K, D)
        self._rot_pos[:] = base
        if self.inv_freq.ndim == 1:
            rope(self._rot, 1, D, c.rope_dim, self._rot_pos, self.inv_freq, self.rope_mode)
        else:                           # a row of frequencies per layer (sliding-window layers' base)
            n = H * K
            for li in range(L):
                rope(self._rot[li * n:(li + 1) * n], 1, D, c.rope_dim, self._rot_pos[li * n:(li + 1) * n],
                     self.inv_freq[li], self.rope_mode)
        self.k[:, :, :K] = self._rot.reshape(L, H, K, D)
        self.kpos[:K] = base + np.arange(K)
        self.sink_base = base

    def slots_for(self, n: int) -> np.ndarray:
        """Slots for the next n tokens. When the cache is full the n oldest window tokens are evicted
        first, so n must not exceed the window (the caller keeps chunks small under a full ring:
        every token of the chunk then sees the sinks and what is left of the window)."""
        if n > self.window + self.room:
            raise ContextError(f"{n} tokens at once do not fit a ring of {self.n_slots} slots "
                               f"({self.keep} pinned)")
        s = np.empty(n, np.int64)
        for i in range(n):
            s[i] = self._take()
        self._sync_sinks()
        return s

    def next_slot(self) -> int:
        s = self._take()
        if self.sink_saved:
            self._sync_sinks()
        return s

    def trim(self, n_keep: int) -> int:
        """Forget the tokens after the first n_keep. Possible when they are all still in the cache
        (the newest tokens); otherwise the cache is emptied. Returns the tokens kept."""
        d = self._pos - n_keep
        if d <= 0:
            return self._pos
        if not self.wrapped:
            self.offset = self._pos = self.head = n_keep
            return n_keep
        if n_keep < self.oldest:
            self.reset()
            return 0
        # drop the d newest and move the rest of the window, oldest first, to slots keep.. so that
        # the filled slots stay 0..offset-1 (what attention reads)
        K, win = self.keep, self.offset - self.keep
        order = K + (self.head - K - win + np.arange(win - d)) % self.window
        self.k[:, :, K:K + win - d] = self.k[:, :, order]
        self.v[:, :, K:K + win - d] = self.v[:, :, order]
        self.kpos[K:K + win - d] = self.kpos[order]
        self.offset -= d
        self._pos = n_keep
        self.head = self.offset
        return n_keep

    # --- sessions -------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict, dict]:
        meta, arrays = super().get_state()
        meta.update(keep=self.keep, head=self.head, sink_base=self.sink_base, sink_saved=self.sink_saved)
        arrays["sink_k"] = self.sink_k
        return meta, arrays

    def set_state(self, meta: dict, arrays: dict):
        n, pos = _check_common(self, meta, arrays)
        if pos == n:                       # never wrapped: a linear prefix, loads into any ring
            if not np.array_equal(arrays["kpos"], np.arange(n)):
                raise StateError("slot positions are not 0..n-1")
            _copy_kv(self, arrays, n)
            self.reset()
            self.offset = self._pos = n
            self.head = n if n < self.n_slots else self.keep
            return
        if meta["kind"] != "ring" or int(meta["n_slots"]) != self.n_slots or int(meta["keep"]) != self.keep:
            raise StateError(f"the session's cache has wrapped (ring of {meta['n_slots']} slots, keep "
                             f"{meta.get('keep')}); this context is a ring of {self.n_slots} slots, keep {self.keep}")
        head, base = int(meta["head"]), int(meta["sink_base"])
        kpos = np.asarray(arrays["kpos"], np.int64)
        sink_k = arrays.get("sink_k")
        if sink_k is None or tuple(sink_k.shape) != self.sink_k.shape:
            raise StateError("sink keys missing or of the wrong shape")
        win = n - self.keep
        oldest = pos - win
        # the window holds positions oldest..pos-1, one per slot, the newest just before head
        ok = (n >= self.keep and self.keep <= head < self.n_slots and base == oldest - self.keep
              and (n == self.n_slots or head == n))
        if ok:
            ok = np.array_equal(kpos[:self.keep], base + np.arange(self.keep))
            slots = self.keep + (head - self.keep - 1 - np.arange(win)) % self.window
            ok = ok and bool(np.all(slots < n)) and np.array_equal(kpos[slots], pos - 1 - np.arange(win))
        if not ok:
            raise StateError("ring positions are inconsistent")
        _copy_kv(self, arrays, n)
        self.sink_k[...] = sink_k
        self.offset, self._pos, self.head = n, pos, head
        self.sink_base, self.sink_saved = base, bool(meta["sink_saved"])


class KVPool:
    """The keys and values of n_seq sequences of `cap` slots each, in one allocation:
    k, v (n_seq, n_layers, n_kv_heads, cap, head_dim), kpos (n_seq, cap). Sequence i's cache is a
    KVCache or RingKVCache on the views k[i], v[i], kpos[i] (`cache(i, ...)`), C-contiguous like a
    cache of its own: prompt chunks and the fused one-token decode step (a lone sequence) run on it
    with the kernels a single context compiled; a batched decode step reads every sequence's
    layer li from k[seq, li] (kernels.attention.attend_batch)."""

    def __init__(self, cfg: ModelConfig, n_seq: int, cap: int):
        if n_seq < 1 or cap < 2:
            raise ContextError(f"a KV pool needs at least one sequence of 2 slots (got {n_seq} x {cap})")
        shape = (n_seq, cfg.n_layers, cfg.n_kv_heads, cap, cfg.head_dim)
        self.cfg, self.n_seq, self.cap = cfg, n_seq, cap
        self.k = lazy_zeros(shape)
        self.v = lazy_zeros(shape)
        self.kpos = np.zeros((n_seq, cap), np.int64)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def cache(self, i: int, policy: str = "stop", keep: int = 4, inv_freq=None, rope_mode=None) -> KVCache:
        arrays = (self.k[i], self.v[i], self.kpos[i])
        if policy == "shift":
            return RingKVCache(self.cfg, self.cap, keep, inv_freq, rope_mode, arrays=arrays)
        return KVCache(self.cfg, self.cap, arrays=arrays)
