"""KV cache: keys (after RoPE) and values of every layer, one slot per token.

`KVCache(cfg, n_slots)` fills slots in order. Arrays: k, v (n_layers, n_kv_heads, n_slots,
head_dim) float32; kpos (n_slots,) the token position held by each slot. `offset` is the number
of filled slots. RingKVCache (issue 5) reuses the same arrays with wrap-around.
"""
from __future__ import annotations

import mmap

import numpy as np

from .config import ModelConfig


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
    def __init__(self, cfg: ModelConfig, n_slots: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, n_slots, cfg.head_dim)
        self.k = lazy_zeros(shape)
        self.v = lazy_zeros(shape)
        self.kpos = np.zeros(n_slots, np.int64)
        self.n_slots = n_slots
        self.offset = 0          # filled slots (== next position for a linear cache)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def slots_for(self, n: int) -> np.ndarray:
        """Slots that the next n tokens will be written to (and their positions recorded)."""
        s = np.arange(self.offset, self.offset + n)
        self.kpos[s] = s
        return s

    def next_slot(self) -> int:
        """The slot of the next single token (decode), its position recorded; allocates nothing."""
        s = self.offset
        self.kpos[s] = s
        return s

    def trim(self, n_keep: int):
        """Forget everything after the first n_keep tokens (prefix reuse)."""
        self.offset = min(self.offset, n_keep)

    def reset(self):
        self.offset = 0
