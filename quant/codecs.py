"""Numpy reference codecs: one per block format, on (n_blocks, block_size) / (n_blocks, type_size) arrays.

These are the definitions the fast Numba quantizers (quant/quantize.py) and the runtime's kernels are
tested against. They follow gguf-py's `gguf.quants` (itself a port of ggml's reference C code) bit for
bit: every intermediate is float32, scales are rounded to float16 with numpy's round-to-nearest-even,
and values are rounded the way the C code does (roundf = half away from zero for Q8_0, truncation
after adding 8.5 / 0.5 for Q4_0 / Q4_1).

    quantize_blocks(x)   x: (n_blocks, block_size) float32  -> (n_blocks, type_size) uint8
    dequantize_blocks(b) b: (n_blocks, type_size) uint8      -> (n_blocks, block_size) float32

`quantize(x, qt)` / `dequantize(raw, qt)` apply a codec to whole rows: x is (..., n) float32 with n a
multiple of the block size; raw is (..., n // block_size * type_size) uint8.
"""
from __future__ import annotations

import numpy as np

from .types import BF16, F16, F32, Q4_0, Q4_1, Q8_0, QType

F32_ = np.float32


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf on float32: floor(|v|) + floor(2 * frac(|v|)), with the sign of v."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(F32_(2) * (a - fl)))


def _scale_div(num: np.ndarray, den: float) -> np.ndarray:
    return (num / F32_(den)).astype(np.float32, copy=False)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        inv = F32_(1) / d
    return np.where(d == 0, F32_(0), inv).astype(np.float32, copy=False)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):                          # out of range -> inf, as the C code does
        return v.astype(np.float16).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q: (n, 32) uint8 in 0..15 -> (n, 16) uint8: byte j holds element j (low) and j + 16 (high)."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


class Codec:
    qtype: QType

    @staticmethod
    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def dequantize_blocks(b: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Q8_0Codec(Codec):
    """32 values: f16 d, int8 q[32]; d = max|x| / 127, q = roundf(x / d)."""
    qtype = Q8_0

    @staticmethod
    def quantize_blocks(x):
        x = np.asarray(x, dtype=np.float32)
        d = _scale_div(np.abs(x).max(axis=1, keepdims=True), 127)
        q = _round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16_bytes(d), q], axis=1)

    @staticmethod
    def dequantize_blocks(b):
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        return b[:, 2:].view(np.int8).astype(np.float32) * d


class Q4_0Codec(Codec):
    """32 values: f16 d, 16 bytes of nibbles; d = (value of largest magnitude) / -8, x = d * (nib - 8)."""
    qtype = Q4_0

    @staticmethod
    def quantize_blocks(x):
        x = np.asarray(x, dtype=np.float32)
        imax = np.abs(x).argmax(axis=1)[:, None]                 # first index of the largest |x|
        d = _scale_div(np.take_along_axis(x, imax, axis=1), -8)
        v = np.trunc(x * _inverse(d) + F32_(8.5))
        q = np.minimum(v.astype(np.uint8), np.uint8(15))
        return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)

    @staticmethod
    def dequantize_blocks(b):
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = _unpack_nibbles(b[:, 2:]).astype(np.float32) - F32_(8)
        return d * q


class Q4_1Codec(Codec):
    """32 values: f16 d, f16 m, 16 bytes of nibbles; m = min, d = (max - min) / 15, x = d * nib + m."""
    qtype = Q4_1

    @staticmethod
    def quantize_blocks(x):
        x = np.asarray(x, dtype=np.float32)
        lo = x.min(axis=1, keepdims=True)
        hi = x.max(axis=1, keepdims=True)
        d = _scale_div(hi - lo, 15)
        v = np.trunc((x - lo) * _inverse(d) + F32_(0.5))
        q = np.minimum(v.astype(np.uint8), np.uint8(15))
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)

    @staticmethod
    def dequantize_blocks(b):
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        return d * _unpack_nibbles(b[:, 4:]).astype(np.float32) + m


class F32Codec(Codec):
    qtype = F32

    @staticmethod
    def quantize_blocks(x):
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)

    @staticmethod
    def dequantize_blocks(b):
        return np.ascontiguousarray(b).view(np.float32)


class F16Codec(Codec):
    """numpy's float32 -> float16 cast (round to nearest even), exactly what gguf-py writes."""
    qtype = F16

    @staticmethod
    def quantize_blocks(x):
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(np.float16)).view(np.uint8)

    @staticmethod
    def dequantize_blocks(b):
        return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


class BF16Codec(Codec):
    """Upper 16 bits of the float32, rounded to nearest even; NaNs become quiet NaNs (as ggml does)."""
    qtype = BF16

    @staticmethod
    def quantize_blocks(x):
        n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        n = np.where((n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000),
                     (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
        r = (n.astype(np.uint64) + (np.uint64(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16)
        return r.astype(np.uint16).view(np.uint8)

    @staticmethod
    def dequantize_blocks(b):
        u = np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return u.view(np.float32)


CODECS: dict[int, type[Codec]] = {c.qtype.id: c for c in (F32Codec, F16Codec, BF16Codec, Q8_0Codec, Q4_0Codec, Q4_1Codec)}


def codec_for(qt: QType) -> type[Codec]:
    try:
        return CODECS[qt.id]
    except KeyError:
        raise NotImplementedError(f"no codec for {qt.name}") from None


def quantize(x: np.ndarray, qt: QType) -> np.ndarray:
    """Reference quantization of rows x (..., n) float32 -> (..., n // block_size * type_size) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    if n % qt.block_size:
        raise ValueError(f"row length {n} is not a multiple of the {qt.name} block size {qt.block_size}")
    blocks = x.reshape(-1, qt.block_size) if qt.block_size > 1 else x.reshape(-1, 1)
    out = codec_for(qt).quantize_blocks(blocks)
    return out.reshape(*x.shape[:-1], qt.row_bytes(n))


def dequantize(raw: np.ndarray, qt: QType) -> np.ndarray:
    """Reference dequantization of rows raw (..., row_bytes) uint8 -> (..., n) float32."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    nb = raw.shape[-1]
    if nb % qt.type_size:
        raise ValueError(f"{nb} bytes per row is not a multiple of the {qt.name} block size {qt.type_size}")
    if qt.id in CODECS:
        out = CODECS[qt.id].dequantize_blocks(raw.reshape(-1, qt.type_size))
    else:                       # the other block formats: their reference (quant/formats)
        from .formats import format_of
        f = format_of(qt.id)
        if f is None:
            raise NotImplementedError(f"no codec for {qt.name}")
        out = f.dequantize(raw.reshape(-1, qt.type_size))
    return out.reshape(*raw.shape[:-1], nb // qt.type_size * qt.block_size)
