"""The llama family: Llama 2/3, SmolLM, TinyLlama, Mistral (no sliding window), Qwen2 (q/k/v biases),
Qwen3, Gemma 3, Phi-3 and SmolLM3; how each differs is its config.ARCHS entry (ArchTraits).

Fused matrices (phi3's attn_qkv and ffn_up = gate|up; attn_qkv in any llama.cpp-style file) are
split at load into table rows at their row offsets in the file: views, no copy. Per-layer RoPE is
a row of `inv_freq` per layer: sliding-window layers their own base, NoPE layers (smollm3) zeros
(the identity rotation), LongRoPE (phi3) the factors chosen by the context size (use_context).

Weights stay in the memory-mapped file; `LlamaModel` holds a tensor table into it (see
kernels/qmatmul.py) plus the small 1-D tensors.
Prefill runs a chunk of tokens through int8-activation matmuls (qmatmul.matmul_i8_group) or
float32 BLAS on dequantized weight tiles (see Scratch); decode runs one token through a single
fused Numba call (`decode_step`).
"""
from __future__ import annotations

import functools
import math
from collections import Counter, namedtuple

import numpy as np
from numba import njit

from infer.quant import codecs
from infer.quant.formats import FORMATS

from ..errors import TensorError, UnsupportedError
from ..kernels import blockir
from ..kernels import qmatmul as qm
from ..kernels import simd
from ..kernels.attention import attend_batch, attend_one, attend_rows, masked_softmax
from ..kernels.ops import (ROPE_NEOX, ROPE_NORM, exp32, gelu, gelu_mul, gelu_mul_par, head_rmsnorm, rmsnorm,
                           rope, rope_inv_freq, silu_mul, silu_mul_par)
from ..kernels.qmatmul import FM, TAB_COLS, TAB_ROWS, TAB_WIDTH
from ..rope import frequencies as rope_frequencies

# per-layer matrices, in table order
MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
K_Q, K_K, K_V, K_O, K_GATE, K_UP, K_DOWN = range(7)
# per-layer vectors, in vector-table order (-1 offset when absent)
VECS = ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
        "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "post_ffw_norm.weight")
V_ATTN_NORM, V_FFN_NORM, V_BQ, V_BK, V_BV, V_QNORM, V_KNORM, V_POST_ATTN, V_POST_FFN = range(9)
ACT_SILU, ACT_GELU = 0, 1

# decode_step's arguments, in three bundles (Numba passes named tuples as typed structs)
DecodeWeights = namedtuple("DecodeWeights", "wu8 vec tab vtab embd outt out_norm inv_freq windows")
DecodeConfig = namedtuple("DecodeConfig", "n_layers dim n_heads n_kv head_dim n_ff rope_dim rope_mode eps scale "
                                          "attn_bias qk_norm embd_mul post_norms act q_pass_mul")
DecodeBuffers = namedtuple("DecodeBuffers", "x xn qkv att scores gu xsum starts tmp logits offs3 offs2 offs1 "
                                            "chunks xq xd xsq use_i8")
# F32/F16/BF16 and every block format of quant/formats (blockir's kernels)
NATIVE = {qm.T_F32, qm.T_F16, qm.T_BF16, *FORMATS}
# with int8 activations (AVX2) the prompt's quantized matmuls run qmatmul.matmul_i8_group (weights read as
# they are, each block unpacked once per 8 tokens); otherwise dequantized tiles + float32 BLAS
I8_SHORT = 32            # prompt chunks of at most this many tokens always run int8 (see Scratch)
I8_MIN_DIM_1T = 1024     # one thread: int8 for long prompts from this model width on
# queries per attention task of a prompt (LlamaModel._attend)
ATT_ROWS = 64
FFN_ROWS = 128         # prompt tokens per FFN pass on int8 activations (Scratch.pgu)
ATT_PAR_MIN = 256      # tokens in a chunk before its attention tasks go to worker threads
ATT_ROWS_MAX_SEEN = 512  # shorter chunks over at most this many cache slots: attend_rows (LlamaModel._attend)


class LlamaModel:
    def __init__(self, gf, cfg):
        self.gf, self.cfg = gf, cfg
        self.observer = None    # calibration: observer(tensor_name, h) before each prefill matmul
        self._names = {}        # tensor file offset -> name (for the observer)
        # how the prompts ran, counted per call ("int8", "blas", "matvec", "attend_rows",
        # "attn_tasks", "attn_tasks_threads"): the tests check that each route was taken
        self.routes = Counter()
        # a first run's second process compiling the decode kernels (kernels.warmup.Background):
        # waited for before the first matvec, which then loads them from the cache
        self.pending = None
        c = cfg
        src = gf.path
        vecs = []
        self._vec_len = 0

        def vec(name, n, required=True):
            t = gf.tensors.get(name)
            if t is None:
                if required:
                    raise TensorError(f"{src}: missing tensor {name}")
                return -1
            if t.shape != (n,):
                raise TensorError(f"{src}: tensor {name} has shape {list(t.shape)}, expected [{n}]")
            if t.qtype.name == "F32":
                a = gf.view(name)
            elif t.qtype.name == "F16":
                a = gf.view(name).view(np.float16).astype(np.float32)
            else:
                raise UnsupportedError(f"{src}: tensor {name} has type {t.qtype.name}; 1-D tensors must be F32 or F16")
            off = self._vec_len
            vecs.append(np.asarray(a, np.float32))
            self._vec_len += n
            return off

        def mat(name, rows, cols, required=True):
            t = gf.tensors.get(name)
            if t is None:
                if required:
                    raise TensorError(f"{src}: missing tensor {name}")
                return None
            if t.shape != (rows, cols):
                raise TensorError(f"{src}: tensor {name} has shape {list(t.shape)}, expected {[rows, cols]}")
            if t.qtype.id not in NATIVE:
                names = ", ".join(["F32", "F16", "BF16"] + [f.name for f in FORMATS.values()])
                raise UnsupportedError(f"{src}: tensor {name} has type {t.qtype.name}, not supported "
                                       f"(supported: {names})")
            row = np.zeros(TAB_WIDTH, np.int64)
            row[:4] = (t.offset, t.qtype.id, rows, cols)
            self._names[t.offset] = name
            return row

        def split(name, parts, cols):
            """Table rows for the matrices stacked in fused tensor `name` (rows `parts`, in order):
            views at their row offsets into the file, no copy."""
            row = mat(name, sum(parts), cols)
            t = gf.tensors[name]
            row_bytes = t.nbytes // sum(parts)
            out, r0 = np.repeat(row[None], len(parts), 0), 0
            for j, r in enumerate(parts):
                out[j, 0], out[j, qm.TAB_ROWS] = t.offset + r0 * row_bytes, r
                self._names[int(out[j, 0])] = name
                r0 += r
            return out

        L = c.n_layers
        self.tab = np.zeros((L, len(MATS), TAB_WIDTH), np.int64)
        self.vtab = np.full((L, len(VECS)), -1, np.int64)
        shapes = {"attn_q": (c.q_dim, c.dim), "attn_k": (c.kv_dim, c.dim), "attn_v": (c.kv_dim, c.dim),
                  "attn_output": (c.dim, c.q_dim), "ffn_gate": (c.n_ff, c.dim), "ffn_up": (c.n_ff, c.dim),
                  "ffn_down": (c.dim, c.n_ff)}
        for i in range(L):
            done = set()
            # fused q|k|v (llama.cpp's create_tensor_qkv takes attn_qkv in place of the three)
            if f"blk.{i}.attn_qkv.weight" in gf.tensors:
                if f"blk.{i}.attn_qkv.bias" in gf.tensors:
                    raise UnsupportedError(f"{src}: tensor blk.{i}.attn_qkv.bias (a fused q/k/v bias) is not supported")
                self.tab[i, K_Q:K_V + 1] = split(f"blk.{i}.attn_qkv.weight", (c.q_dim, c.kv_dim, c.kv_dim), c.dim)
                done |= {K_Q, K_K, K_V}
            if c.fused_gate_up:         # phi3: ffn_up holds gate then up (llama.cpp's LLM_FFN_SWIGLU halves)
                self.tab[i, K_GATE:K_UP + 1] = split(f"blk.{i}.ffn_up.weight", (c.n_ff, c.n_ff), c.dim)
                done |= {K_GATE, K_UP}
            for k, m in enumerate(MATS):
                if k not in done:
                    self.tab[i, k] = mat(f"blk.{i}.{m}.weight", *shapes[m])
            self.vtab[i, V_ATTN_NORM] = vec(f"blk.{i}.attn_norm.weight", c.dim)
            self.vtab[i, V_FFN_NORM] = vec(f"blk.{i}.ffn_norm.weight", c.dim)
            if c.post_norms:
                self.vtab[i, V_POST_ATTN] = vec(f"blk.{i}.post_attention_norm.weight", c.dim)
                self.vtab[i, V_POST_FFN] = vec(f"blk.{i}.post_ffw_norm.weight", c.dim)
            if c.qk_norm:
                self.vtab[i, V_QNORM] = vec(f"blk.{i}.attn_q_norm.weight", c.head_dim)
                self.vtab[i, V_KNORM] = vec(f"blk.{i}.attn_k_norm.weight", c.head_dim)
            if c.attn_bias:
                self.vtab[i, V_BQ] = vec(f"blk.{i}.attn_q.bias", c.q_dim)
                self.vtab[i, V_BK] = vec(f"blk.{i}.attn_k.bias", c.kv_dim)
                self.vtab[i, V_BV] = vec(f"blk.{i}.attn_v.bias", c.kv_dim)
        self.embd = mat("token_embd.weight", c.n_vocab, c.dim)
        # a prompt's embeddings are a few rows: the numpy codec (decode's fused step has its own);
        # no kernel to compile before a first run's first token
        self.embd_raw = gf.raw("token_embd.weight")
        self.embd_qtype = gf.tensors["token_embd.weight"].qtype
        out = mat("output.weight", c.n_vocab, c.dim, required=False)
        self.tied = out is None
        self.out = self.embd if out is None else out
        self.out_norm = vec("output_norm.weight", c.dim)
        self.vec = np.concatenate(vecs) if vecs else np.zeros(1, np.float32)
        self.wu8 = gf.data
        self.base_inv = np.zeros(c.rope_dim // 2, np.float64)
        rope_inv_freq(c.rope_dim, c.rope_base, self.base_inv)

        def factors(name):
            ff = gf.tensors.get(name)
            if ff is None:
                return None
            if ff.shape != (c.rope_dim // 2,) or ff.qtype.name != "F32":
                raise TensorError(f"{src}: tensor {name} has shape {list(ff.shape)} and type "
                                  f"{ff.qtype.name}, expected [{c.rope_dim // 2}] F32")
            ff = np.asarray(gf.view(name), np.float64)
            if not (np.isfinite(ff).all() and (ff > 0).all()):
                raise TensorError(f"{src}: tensor {name} holds factors that are not positive numbers")
            return ff
        ff = factors("rope_freqs.weight")            # Llama 3.x: per-dimension frequency factors
        # LongRoPE (phi3): short and long factors, chosen by the context size (use_context); as
        # llama.cpp's get_rope_factors, a file's rope_freqs comes first
        self.rope_factors = None
        long, short = factors("rope_factors_long.weight"), factors("rope_factors_short.weight")
        if ff is None and (long is not None or short is not None):
            if long is None or short is None:
                raise TensorError(f"{src}: tensor rope_factors_{'long' if long is None else 'short'}.weight is "
                                  f"missing (LongRoPE needs both)")
            self.rope_factors = (short, long)
            ff = short
        # a RoPE row per layer: sliding-window layers have their own base, unscaled (llama.cpp's
        # freq_base_swa); NoPE layers (smollm3) a row of zeros, the identity rotation
        self.inv_freq = np.zeros((c.n_layers, c.rope_dim // 2), np.float64)
        self.windows = np.zeros(c.n_layers, np.int64)
        mscale = self._set_frequencies(ff)
        # context scaling's magnitude factor m is folded into the attention scale as m^2 (rope.py);
        # with partial rotary (rope_dim < head_dim) it belongs to the rotated dimensions only, so
        # the query's other dimensions are multiplied by 1/m^2 (the keys stay as RoPE leaves them)
        self.q_pass_mul = np.float32(1.0 / (mscale * mscale) if c.rope_dim < c.head_dim else 1.0)
        self.attn_scale = np.float32(mscale * mscale / math.sqrt(c.attn_scale_dim or c.head_dim))
        self.embd_mul = np.float32(math.sqrt(c.dim)) if c.embd_scale else np.float32(1.0)
        self.act = ACT_GELU if c.act == "gelu" else ACT_SILU
        self.rope_mode = ROPE_NEOX if c.rope_neox else ROPE_NORM
        self.max_cols = max(c.dim, c.n_ff, c.q_dim)
        self.weight_bytes = int(sum(t.nbytes for t in gf.tensors.values()))
        # the matrices a prompt multiplies together (LlamaModel._matmuls)
        self.tab_qkv = np.ascontiguousarray(self.tab[:, [K_Q, K_K, K_V]])
        self.tab_gu = np.ascontiguousarray(self.tab[:, [K_GATE, K_UP]])
        # the kernels, compiled for the block formats this model's matrices have
        self.formats = blockir.mask_of({int(t) for t in self.tab[:, :, qm.TAB_TYPE].ravel()} |
                                       {int(self.embd[qm.TAB_TYPE]), int(self.out[qm.TAB_TYPE])})
        self.k = qm.kernels(self.formats)
        self.decode_step = decode_step_for(self.formats)
        self.dw = DecodeWeights(self.wu8, self.vec, self.tab, self.vtab, self.embd, self.out, self.out_norm,
                                self.inv_freq, self.windows)
        self.dc = DecodeConfig(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_ff, c.rope_dim,
                               self.rope_mode, np.float32(c.norm_eps), self.attn_scale, c.attn_bias, c.qk_norm,
                               self.embd_mul, c.post_norms, self.act, self.q_pass_mul)

    def _set_frequencies(self, ff):
        """Fill self.inv_freq (in place: decode's bundle and a ring cache hold it) for the
        per-dimension factors ff (or None); returns the magnitude factor m (rope.frequencies)."""
        c = self.cfg
        inv, mscale = rope_frequencies(c, self.base_inv, ff)
        self.inv_freq[:] = inv
        swa_inv = np.zeros(c.rope_dim // 2, np.float64)
        rope_inv_freq(c.rope_dim, c.rope_base_swa, swa_inv)
        for i in range(c.n_layers):
            if c.n_swa and c.swa_layers[i]:
                self.inv_freq[i], self.windows[i] = swa_inv, c.n_swa
            if c.nope_layers and c.nope_layers[i]:
                self.inv_freq[i] = 0.0
        return mscale

    def use_context(self, n_ctx):
        """Set up the model for a context of n_ctx tokens: LongRoPE's long factors when the context
        exceeds the original one (rope.scaling.original_context_length, else the training context),
        its short ones otherwise, as llama.cpp's get_rope_factors chooses (n_ctx_seq > n_ctx_orig_yarn,
        its n_ctx_seq being n_ctx rounded up to a multiple of 256)."""
        if self.rope_factors is not None:
            short, long = self.rope_factors
            n_ctx_seq = -(-int(n_ctx) // 256) * 256
            self._set_frequencies(long if n_ctx_seq > (self.cfg.rope_orig_ctx or self.cfg.n_ctx_train) else short)

    def v(self, layer, which):
        o = self.vtab[layer, which]
        n = self.cfg.dim if which in (V_ATTN_NORM, V_FFN_NORM, V_POST_ATTN, V_POST_FFN) else self.cfg.head_dim if which in (
            V_QNORM, V_KNORM) else self.cfg.q_dim if which == V_BQ else self.cfg.kv_dim
        return self.vec[o:o + n]

    # ------------------------------------------------------------------------------------------
    def new_scratch(self, n_batch, n_slots, n_threads, int8_activations=True):
        return Scratch(self, n_batch, n_slots, n_threads, int8_activations)

    def _matmuls(self, s, tabs, h, out):
        """Several matrices on the same h (n, cols): out (n + s.resid, sum of rows; the result in
        out[:n]), each matrix's result in its columns; on int8 activations h is quantized once
        and one parallel region runs them all."""
        n = h.shape[0]
        if self.observer is not None:       # once per tensor: a fused one's views share its name
            for name in dict.fromkeys(self._names[int(t[0])] for t in tabs):
                self.observer(name, h)
        if s.i8_for(n) and all(int(t[qm.TAB_TYPE]) in FORMATS for t in tabs) and out.flags.c_contiguous:
            self.routes["int8"] += 1
            self._matmul_i8(s, tabs, h, out)
            return
        c0 = 0
        for t in tabs:
            rows = int(t[TAB_ROWS])
            # with the residual row: a single-token chunk's slice is contiguous and may run int8
            self._matmul(s, t, h, out[:n + s.resid, c0:c0 + rows], observe=False)
            c0 += rows

    def _matmul_i8(self, s, tabs, h, out):
        """out[:n] = h @ W.T for the matrices `tabs` on int8 activations. With s.resid the last row
        runs in two int8 parts, its values and what they miss (blockir.quantize_rows), as one more
        row of the same matmul, folded into row n - 1: the prompt's last token, whose logits pick
        the reply's first token, gets nearly float precision for 1/n of the work."""
        n, cols = h.shape
        r = s.resid
        # where the residual row would take a token group of its own (n a multiple of MAXT: a
        # 128-token prompt's 17th group, 6 % of its matmuls), the last row's float product comes
        # from decode's float matvec instead (one read of the weights, bandwidth-bound)
        exact_last = bool(r) and n % simd.MAXT == 0 and not (self.pending is not None and self.pending.running())
        if exact_last:
            r = 0
        nb = cols // 32
        ng = (n + r + simd.MAXT - 1) // simd.MAXT           # token groups (blockir.quantize_rows)
        xq = s.pxq[:ng * nb * simd.MAXT * 32].reshape(ng, nb, simd.MAXT, 32)
        xg = s.pxg[:ng * blockir.XG_FIELDS * nb * simd.MAXT].reshape(ng, nb, blockir.XG_FIELDS, simd.MAXT)
        kinds = {FORMATS[int(t[qm.TAB_TYPE])].kscales is not None for t in tabs}
        if False in kinds:          # 32-value formats: a scale per 4 values
            blockir.quantize_prompt(h, xq, xg, bool(r))
        if True in kinds:           # 256-value formats: a step per 16 values
            blockir.quantize_rows_k(h, s.pxk, s.pxkf, bool(r))
        self.k.matmul_i8(self.wu8, tabs, xq, xg, s.pxk, s.pxkf, out[:n + r], s.n_threads, s.starts)
        if r:
            out[n - 1] += out[n]
        elif exact_last:
            self._wait_pending()
            offs = np.zeros(len(tabs), np.int64)
            offs[1:] = np.cumsum(tabs[:-1, TAB_ROWS])
            self.k.mv(self.wu8, tabs, h[n - 1], s.xsum, out[n - 1], offs, s.chunks[4], s.starts, s.tmp,
                      s.xq, s.xd, s.xsq, False)

    def _matmul(self, s, tab, h, out, allow_i8=True, observe=True):
        """out[:n] (out: n or, with s.resid, n + 1 rows) = h (n, cols) @ W.T: int8 activations (see
        _matmul_i8) or W dequantized in tiles into s.wbuf and float32 BLAS."""
        if observe and self.observer is not None:
            self.observer(self._names[int(tab[0])], h)
        rows, cols = int(tab[TAB_ROWS]), int(tab[TAB_COLS])
        n = h.shape[0]
        if allow_i8 and s.i8_for(n) and int(tab[qm.TAB_TYPE]) in FORMATS and out.flags.c_contiguous:
            self.routes["int8"] += 1
            self._matmul_i8(s, tab.reshape(1, -1), h, out)
            return
        out = out[:n]
        if n == 1 and out.flags.c_contiguous:
            # one row (the prompt's logits): decode's float matvec, no dequantized copy
            if self.pending is not None and self.pending.running():
                # a first run whose second process is still compiling the matvecs: numpy
                # (~0.3 s for SmolLM2's head) rather than waiting for it
                self.routes["numpy"] += 1
                name = self._names[int(tab[0])]
                raw, qt = self.gf.raw(name), self.gf.tensors[name].qtype
                for r0 in range(0, rows, 4096):
                    w = codecs.dequantize(raw[r0:r0 + 4096], qt)
                    np.matmul(h, w.T, out=out[:, r0:r0 + w.shape[0]])
                return
            self.routes["matvec"] += 1
            self._wait_pending()
            self.k.mv(self.wu8, tab.reshape(1, -1), h[0], s.xsum, out.reshape(-1), s.offs1, s.chunks[4],
                s.starts, s.tmp, s.xq, s.xd, s.xsq, False)
            return
        self.routes["blas"] += 1
        if s.wbuf is None:
            s.wbuf = np.zeros(s.wbuf_size, np.float32)
        tile = s.wbuf.shape[0] // cols
        for r0 in range(0, rows, tile):
            r1 = min(rows, r0 + tile)
            w = s.wbuf[:(r1 - r0) * cols].reshape(r1 - r0, cols)
            # serial: OpenBLAS's threads spin after a call and would fight Numba's for the cores
            self.k.dequant(self.wu8, tab, r0, r1, w, s.tmp[0])
            np.matmul(h, w.T, out=out[:, r0:r1])

    def _embed(self, s, tokens):
        n = len(tokens)
        x = s.px[:n]
        x[:] = codecs.dequantize(self.embd_raw[np.asarray(tokens, np.int64)], self.embd_qtype)
        if self.cfg.embd_scale:
            x *= self.embd_mul
        return x

    def _layers(self, s, x, qpos, store, attend, resid):
        """The transformer layers over the n rows of x (in place): the one layer definition of
        prompt chunks (rows: consecutive tokens of one sequence) and batched decode (rows: one
        token of each of several sequences). store(li, k, v) writes the rows' keys and values to
        their caches, attend(li, qkv, att) computes their attention; resid: whether the last row's
        matmuls get a residual row (see _matmul_i8)."""
        c = self.cfg
        n = x.shape[0]
        h = s.ph[:n]
        qkv, fr = s.pqkv[:n], s.ffn_rows
        q, k, v = qkv[:, :c.q_dim], qkv[:, c.q_dim:c.q_dim + c.kv_dim], qkv[:, c.q_dim + c.kv_dim:]
        qkv1, h1 = s.pqkv[:n + 1], s.ph[:n + 1]
        att = s.patt[:n]
        for li in range(c.n_layers):
            t = self.tab[li]
            rmsnorm(x, self.v(li, V_ATTN_NORM), c.norm_eps, h)
            s.resid = resid
            self._matmuls(s, self.tab_qkv[li], h, qkv1)
            if c.attn_bias:
                q += self.v(li, V_BQ); k += self.v(li, V_BK); v += self.v(li, V_BV)
            if c.qk_norm:
                head_rmsnorm(q, c.n_heads, c.head_dim, self.v(li, V_QNORM), np.float32(c.norm_eps))
                head_rmsnorm(k, c.n_kv_heads, c.head_dim, self.v(li, V_KNORM), np.float32(c.norm_eps))
            rope(q, c.n_heads, c.head_dim, c.rope_dim, qpos, self.inv_freq[li], self.rope_mode)
            rope(k, c.n_kv_heads, c.head_dim, c.rope_dim, qpos, self.inv_freq[li], self.rope_mode)
            if self.q_pass_mul != 1:
                for hh in range(c.n_heads):
                    q[:, hh * c.head_dim + c.rope_dim:(hh + 1) * c.head_dim] *= self.q_pass_mul
            store(li, k.reshape(n, c.n_kv_heads, c.head_dim), v.reshape(n, c.n_kv_heads, c.head_dim))
            attend(li, qkv, att)
            self._matmul(s, t[K_O], att, h1)
            if c.post_norms:
                rmsnorm(h, self.v(li, V_POST_ATTN), c.norm_eps, h)
            x += h
            rmsnorm(x, self.v(li, V_FFN_NORM), c.norm_eps, h)
            for r0 in range(0, n, fr):      # the FFN in row blocks: s.pgu holds fr rows
                r1 = min(n, r0 + fr)
                s.resid = resid if r1 == n else 0
                gu, hr = s.pgu[:r1 - r0], h[r0:r1]
                self._matmuls(s, self.tab_gu[li], hr, s.pgu[:r1 - r0 + 1])
                par = (gelu_mul_par, silu_mul_par)[self.act == ACT_SILU]
                if s.pg is not None:
                    g = s.pg[:r1 - r0]
                    par(gu, g)
                else:           # in place: the gate half of gu, the down matmul's input as a view
                    (par if s.blas_threads == 1 else (gelu_mul, silu_mul)[self.act == ACT_SILU])(gu, gu)
                    g = gu[:, :c.n_ff]
                self._matmul(s, t[K_DOWN], g, s.ph[r0:r1 + 1])
            if c.post_norms:
                rmsnorm(h, self.v(li, V_POST_FFN), c.norm_eps, h)
            x += h
        s.resid = 0

    def prefill(self, s, kv, tokens, all_logits=False):
        """Run tokens (a chunk of at most s.n_batch) at positions kv.pos.. and fill the cache.
        Returns logits (n, n_vocab) if all_logits else (n_vocab,) for the last token (views into s)."""
        c = self.cfg
        n = len(tokens)
        slots = kv.slots_for(n)
        qpos = kv.kpos[slots].copy()
        x = self._embed(s, tokens)
        h = s.ph[:n]
        n_filled = kv.offset          # slots_for advanced it (a full ring stays at its size)

        def store(li, k, v):
            kv.k[li][:, slots, :] = k.transpose(1, 0, 2)
            kv.v[li][:, slots, :] = v.transpose(1, 0, 2)

        def attend(li, qkv, att):
            self._attend(s, qkv, kv.k[li], kv.v[li], qpos, kv.kpos, n_filled, self.attn_scale, att,
                         int(self.windows[li]))

        # the matmuls' outputs have a row more (see _matmul_i8): the last token's residual row
        self._layers(s, x, qpos, store, attend, 0 if all_logits else 1)
        if all_logits:
            rmsnorm(x, self.vec[self.out_norm:self.out_norm + c.dim], c.norm_eps, h)
            out = np.empty((n, c.n_vocab), np.float32)
            self._matmul(s, self.out, h, out)
            return out
        rmsnorm(x[n - 1:n], self.vec[self.out_norm:self.out_norm + c.dim], c.norm_eps, h[:1])
        # float activations for the prompt's logits: they pick the first token, and int8 noise
        # (~0.3 on SmolLM2's logits) flipped a near tie in the chat test
        self._matmul(s, self.out, h[:1], s.logits2d, allow_i8=False)
        return s.logits

    def decode_batch(self, s, pool, seqs, caches, tokens, out):
        """One decode step of several sequences in one pass over the weights: token tokens[r] of
        sequence seqs[r], whose cache caches[r] is pool.cache(seqs[r]) (KVPool); its logits into
        out[r] (out: (>= n, n_vocab), C-contiguous). n <= s.n_batch."""
        c = self.cfg
        self._wait_pending()
        n = len(tokens)
        seq = np.asarray(seqs, np.int64)
        slots = np.array([kv.next_slot() for kv in caches], np.int64)
        qpos = pool.kpos[seq, slots]
        n_filled = np.array([kv.offset for kv in caches], np.int64)
        x = self._embed(s, tokens)
        h = s.ph[:n]
        nw = max(1, min(s.n_threads, s.ascores.size // pool.cap, n * c.n_heads))
        scores = s.ascores.reshape(-1)[:nw * pool.cap].reshape(nw, pool.cap)

        def store(li, k, v):
            pool.k[seq, li, :, slots] = k
            pool.v[seq, li, :, slots] = v

        def attend(li, qkv, att):
            attend_batch(qkv, pool.k, pool.v, li, seq, qpos, pool.kpos, n_filled, self.attn_scale,
                         scores, att, int(self.windows[li]))

        self._layers(s, x, qpos, store, attend, 0)
        rmsnorm(x, self.vec[self.out_norm:self.out_norm + c.dim], c.norm_eps, h)
        self._matmul(s, self.out, h, out[:n])
        return out[:n]

    def compile_logits(self, s):
        """Run the prompt's logits route once (one row through the output matrix on float
        activations): a first run's second process compiles it with the decode step, since the
        first process computes those logits with numpy while that process runs."""
        h = np.zeros((1, self.cfg.dim), np.float32)
        self._matmul(s, self.out, h, s.logits2d, allow_i8=False)

    def _attend(self, s, qkv, kc, vc, qpos, kpos, n_filled, scale, att, window=0):
        """Causal attention of the chunk's queries (qkv's first n_heads*head_dim columns) over the
        cache's first n_filled slots into att (n, n_heads*head_dim): attend_rows for a short
        chunk over few slots, else tasks of (KV head, ATT_ROWS queries): float32 BLAS for the
        scores and the weighted sum, masked_softmax between. With int8 prefill, BLAS runs one
        thread and the tasks go to s.n_workers Python threads (BLAS and masked_softmax release
        the GIL): OpenBLAS's own threads spin after each call and took the cores from Numba's."""
        c = self.cfg
        n = qkv.shape[0]
        if n < ATT_PAR_MIN and n_filled <= ATT_ROWS_MAX_SEEN and s.blas_threads == 1:
            # a short chunk over a short context: one Numba region over (query, head) pairs, no
            # BLAS calls or Python tasks (SmolLM2, 128 tokens at the start, two threads: 14 ms
            # for the 30 layers, BLAS 23; its dot products cost ~2x BLAS's per flop, so over
            # more than ~512 slots BLAS on one thread is as fast). Not while BLAS runs several
            # threads (F16, float activations): they spin after each call and took Numba's cores
            n_slots = kc.shape[1]
            nw = max(1, min(s.n_threads, s.ascores.size // n_slots))
            self.routes["attend_rows"] += 1
            attend_rows(qkv, kc, vc, qpos, kpos, n_filled, scale,
                        s.ascores.reshape(-1)[:nw * n_slots].reshape(nw, n_slots), att, window)
            return
        q3 = qkv[:, :c.q_dim].reshape(n, c.n_heads, c.head_dim)
        a3 = att.reshape(n, c.n_heads, c.head_dim)
        tasks = [(kh, t0, min(n, t0 + ATT_ROWS)) for kh in range(self.cfg.n_kv_heads) for t0 in range(0, n, ATT_ROWS)]
        # short chunks stay on this thread: the hand-offs (and the GIL between the BLAS calls)
        # cost more than they save (SmolLM2, 128 tokens: 53 ms on one thread, 70 ms on two)
        nw = min(s.n_workers, len(tasks)) if n >= ATT_PAR_MIN else 1
        self.routes["attn_tasks_threads" if nw > 1 else "attn_tasks"] += 1
        if nw <= 1:
            self._attend_tasks(s, 0, tasks, q3, kc, vc, qpos, kpos, n_filled, scale, a3, window)
            return
        futs = [s.pool().submit(self._attend_tasks, s, w, tasks[w::nw], q3, kc, vc, qpos, kpos, n_filled,
                                scale, a3, window) for w in range(nw)]
        for f in futs:
            f.result()

    def _attend_tasks(self, s, w, tasks, q3, kc, vc, qpos, kpos, n_filled, scale, a3, window=0):
        c = self.cfg
        group, hd = c.n_heads // c.n_kv_heads, c.head_dim
        kp = kpos[:n_filled]
        for kh, t0, t1 in tasks:
            m = t1 - t0
            # slots past the last one any of these queries may see are left out (a linear cache
            # stores positions in order: the causal triangle is skipped)
            seen = np.flatnonzero(kp <= qpos[t0:t1].max())
            ncol = int(seen[-1]) + 1 if seen.size else 1
            qg = s.aqg[w, :m * group * hd].reshape(m, group, hd)
            qg[:] = q3[t0:t1, kh * group:(kh + 1) * group, :]
            sc = s.ascores[w, :m * group * ncol].reshape(m * group, ncol)
            np.matmul(qg.reshape(m * group, hd), kc[kh, :ncol].T, out=sc)
            masked_softmax(sc, qpos[t0:t1], group, kpos, ncol, scale, window)
            og = s.aog[w, :m * group * hd].reshape(m * group, hd)
            np.matmul(sc, vc[kh, :ncol], out=og)
            a3[t0:t1, kh * group:(kh + 1) * group, :] = og.reshape(m, group, hd)

    def _wait_pending(self):
        if self.pending is not None:
            bg, self.pending = self.pending, None
            bg.wait()

    def decode(self, s, kv, token):
        """One token at position kv.pos; returns logits (n_vocab,) (a view into s)."""
        c = self.cfg
        self._wait_pending()
        slot = kv.next_slot()
        s.posv[0] = kv.kpos[slot]
        b = DecodeBuffers(s.x, s.xn, s.qkv, s.att, s.scores, s.gu, s.xsum, s.starts, s.tmp, s.logits,
                          s.offs3, s.offs2, s.offs1, s.chunks, s.xq, s.xd, s.xsq, s.use_i8)
        self.decode_step(self.dw, self.dc, b, int(token), s.posv, int(slot), kv.offset, kv.k, kv.v, kv.kpos)
        return s.logits


class Scratch:
    """Every activation buffer of a context, allocated once (nothing is allocated per token)."""

    def __init__(self, m: LlamaModel, n_batch, n_slots, n_threads, int8_activations=True):
        c = m.cfg
        f = np.float32
        self.n_batch = n_batch
        self.n_threads = n_threads
        nb = n_batch
        self.px = np.zeros((nb, c.dim), f)
        # a row more than the chunk: the last token's residual row (LlamaModel._matmul_i8)
        self.ph = np.zeros((nb + 1, c.dim), f)
        self.pqkv = np.zeros((nb + 1, c.q_dim + 2 * c.kv_dim), f)
        self.patt = np.zeros((nb, c.q_dim), f)
        # int8 prefill: its matmuls are Numba's parallel work; BLAS (attention only) one thread
        # per worker, attention tasks on n_threads Python threads (LlamaModel._attend)
        self.use_i8 = bool(int8_activations and qm.simd.HAVE_AVX2)
        # long prompts too, except on one thread with a small model on a CPU without the
        # token-lane kernel (VNNI): there BLAS on dequantized tiles is faster (Zen 3: SmolLM2, dim
        # 576, pp128: 250 vs 210 tok/s; the 1.1B-shaped model, dim 2048: int8 1.11x llama.cpp, BLAS
        # 0.97x); with token lanes int8 is as fast or faster at every width (Zen 4, 1 thread,
        # pp128: SmolLM2 285-303 vs 266-303 tok/s, Gemma 3 270M 350-365 vs 228-324, Qwen2.5-0.5B
        # 118-124 vs 94-98); short prompts always (I8_SHORT)
        i8_prefill = self.use_i8 and int(m.tab[0, K_GATE, qm.TAB_TYPE]) in FORMATS and \
            (n_threads > 1 or c.dim >= I8_MIN_DIM_1T or blockir.TOKEN_LANES)
        self.i8_prefill = i8_prefill
        # the FFN's gate|up activations, FFN_ROWS tokens at a time on int8 (the weights stream from
        # cache either way; 2 * n_ff floats a token: 6 MiB for SmolLM2's 512, 23 for the 1.1B's);
        # a whole chunk where BLAS may run it (dequantizing a weight tile per block would cost)
        self.ffn_rows = min(nb, FFN_ROWS) if i8_prefill else nb
        self.pgu = np.zeros((self.ffn_rows + 1, 2 * c.n_ff), f)
        # on int8, silu(gate) * up goes to a contiguous buffer: the down matmul's quantizer then
        # has one signature (a strided view of pgu compiled it twice: 0.8 s of a first run)
        self.pg = np.zeros((self.ffn_rows, c.n_ff), f) if i8_prefill else None
        self.blas_threads = 1 if i8_prefill else n_threads
        self.n_workers = n_threads if i8_prefill else 1
        self._pool = None
        group = c.n_heads // c.n_kv_heads
        qb = min(nb, ATT_ROWS)
        self.aqg = np.zeros((self.n_workers, qb * group * c.head_dim), f)
        self.aog = np.zeros((self.n_workers, qb * group * c.head_dim), f)
        self.ascores = np.zeros((self.n_workers, qb * group * n_slots), f)
        # float32 tiles of dequantized weights for BLAS (allocated at first use: with int8
        # activations only F16/BF16/F32 matrices, float-activation runs and a small model's long
        # prompts on one thread need it)
        self.wbuf_size = max(c.n_ff * c.dim, c.q_dim * c.dim, 4096 * c.dim)
        self.wbuf = None
        # decode
        self.x = np.zeros(c.dim, f)
        self.xn = np.zeros(c.dim, f)
        self.qkv = np.zeros(c.q_dim + 2 * c.kv_dim, f)
        self.att = np.zeros(c.q_dim, f)
        self.scores = np.zeros((c.n_heads, n_slots), f)
        self.gu = np.zeros(2 * c.n_ff, f)
        ng = max(c.dim, c.n_ff, c.q_dim) // 32 + 1                        # groups of 32 values
        self.xsum = np.zeros(blockir.XS2_PER_GROUP * ng, f)    # the float kernels' sums per 16
        # int8 activations for the quantized matvecs (AVX2 only; see kernels/blockir.py)
        self.xq = np.zeros(2 * max(c.dim, c.n_ff, c.q_dim), np.int8)   # two forms (qmatmul.prep_x)
        self.xd = np.zeros(blockir.LANES * ng, f)       # a scale per 4 values
        self.xsq = np.zeros(blockir.XS_PER_GROUP * ng, f)   # see blockir.quantize_x
        # prompts on int8 activations (LlamaModel._matmul, blockir.quantize_rows)
        mc = max(c.dim, c.n_ff, c.q_dim)
        ni = (nb if self.i8_prefill else min(nb, I8_SHORT)) if self.use_i8 else 0
        self.pxq = np.zeros((ni + simd.MAXT) // simd.MAXT * simd.MAXT * mc, np.int8)   # whole token groups
        # the 256-value formats' form (blockir.quantize_rows_k)
        self.pxk = np.zeros(self.pxq.shape[0], np.int8)
        self.pxkf = np.zeros((ni + simd.MAXT) // simd.MAXT * (mc // 256 + 1) * blockir.KF_CELL, f)
        self.pxg = np.zeros((ni + simd.MAXT) // simd.MAXT * blockir.XG_FIELDS * (mc // 32) * simd.MAXT, f)
        self.resid = 0          # the prefill's matmuls: whether the last row gets its residual row
        self.starts = np.zeros(4, np.int64)
        self.posv = np.zeros(1, np.int64)          # position of the token being decoded
        import numba
        self.tmp = np.zeros((numba.config.NUMBA_NUM_THREADS, max(m.max_cols, c.dim)), np.uint32)
        self.logits = np.zeros(c.n_vocab, f)
        self.logits2d = self.logits.reshape(1, -1)
        self.offs3 = np.array([0, c.q_dim, c.q_dim + c.kv_dim], np.int64)
        self.offs2 = np.array([0, c.n_ff], np.int64)
        self.offs1 = np.zeros(1, np.int64)
        # rows per parallel task for each matvec group of decode_step: qkv, o, gate+up, down, head;
        # with several threads about 8 tasks per thread so that small matrices split evenly
        groups = (c.q_dim + 2 * c.kv_dim, c.dim, 2 * c.n_ff, c.dim, c.n_vocab)
        if n_threads > 1:
            self.chunks = np.array([max(16, min(64, g // (n_threads * 8)) // 4 * 4) for g in groups], np.int64)
        else:
            self.chunks = np.full(len(groups), 256, np.int64)


    def i8_for(self, n):
        """Whether a prompt chunk of n tokens runs its quantized matmuls on int8 activations."""
        return self.use_i8 and (self.i8_prefill or n <= I8_SHORT)

    def pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.n_workers, thread_name_prefix="infer-attn")
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


@njit(cache=True, fastmath=FM)
def _rmsnorm1(x, w, eps, out):
    ss = np.float32(0.0)
    n = x.shape[0]
    for j in range(n):
        ss += x[j] * x[j]
    inv = np.float32(1.0 / math.sqrt(ss / n + eps))
    for j in range(n):
        out[j] = x[j] * inv * w[j]


@njit(cache=True, fastmath=FM)
def _mv(mask, wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8):
    """One matvec group of decode_step: float activations, or int8 ones when use_i8."""
    qm.prep_x(tabs, x, xsum, xq, xd, xsq, use_i8)
    qm.matvec_group(mask, wu8, tabs, x, xsum, out, offs, chunk, starts, tmp, xq, xd, xsq, use_i8)


@functools.lru_cache(maxsize=None)
def decode_step_for(mask):
    """The fused decode step compiled for the block formats in `mask` (blockir.mask_of; a
    constant of the closure, so that it reaches the kernels' dispatchers as a literal)."""

    # error_model="numpy": a float division with Python's ZeroDivisionError check does not vectorize
    # (decode's SiLU ran 4 ns an element, 0.3 ms of SmolLM2's 7 ms token; vectorized 0.7)
    @njit(cache=True, fastmath=FM, error_model="numpy")
    def decode_step(w, c, b, token, posv, slot, n_filled, kcache, vcache, kpos):
        """The whole forward pass of one token at position posv[0], writing its K/V into `slot` and
        logits into b.logits. w: DecodeWeights, c: DecodeConfig, b: DecodeBuffers. Allocates nothing."""
        wu8, vec, tab, vtab = w.wu8, w.vec, w.tab, w.vtab
        dim, n_heads, n_kv, head_dim, n_ff, eps = c.dim, c.n_heads, c.n_kv, c.head_dim, c.n_ff, c.eps
        x, xn, qkv, att, gu, xsum, starts, tmp = b.x, b.xn, b.qkv, b.att, b.gu, b.xsum, b.starts, b.tmp
        xq, xd, xsq, use_i8, chunks = b.xq, b.xd, b.xsq, b.use_i8, b.chunks
        q_dim = n_heads * head_dim
        kv_dim = n_kv * head_dim
        qm.dequant_rows(mask, wu8, w.embd, token, token + 1, x.reshape((1, dim)), tmp[0])
        if c.embd_mul != np.float32(1.0):
            for j in range(dim):
                x[j] *= c.embd_mul
        for li in range(c.n_layers):
            t = tab[li]
            o = vtab[li, V_ATTN_NORM]
            _rmsnorm1(x, vec[o:o + dim], eps, xn)
            _mv(mask, wu8, t[K_Q:K_V + 1], xn, xsum, qkv, b.offs3, chunks[0], starts, tmp, xq, xd, xsq, use_i8)
            if c.attn_bias:
                for j in range(q_dim):
                    qkv[j] += vec[vtab[li, V_BQ] + j]
                for j in range(kv_dim):
                    qkv[q_dim + j] += vec[vtab[li, V_BK] + j]
                    qkv[q_dim + kv_dim + j] += vec[vtab[li, V_BV] + j]
            q = qkv[:q_dim].reshape((1, q_dim))
            k = qkv[q_dim:q_dim + kv_dim].reshape((1, kv_dim))
            if c.qk_norm:
                o = vtab[li, V_QNORM]
                head_rmsnorm(q, n_heads, head_dim, vec[o:o + head_dim], eps)
                o = vtab[li, V_KNORM]
                head_rmsnorm(k, n_kv, head_dim, vec[o:o + head_dim], eps)
            rope(q, n_heads, head_dim, c.rope_dim, posv, w.inv_freq[li], c.rope_mode)
            rope(k, n_kv, head_dim, c.rope_dim, posv, w.inv_freq[li], c.rope_mode)
            if c.q_pass_mul != np.float32(1.0):
                for hh in range(n_heads):
                    for d in range(c.rope_dim, head_dim):
                        qkv[hh * head_dim + d] *= c.q_pass_mul
            for hh in range(n_kv):
                for d in range(head_dim):
                    kcache[li, hh, slot, d] = qkv[q_dim + hh * head_dim + d]
                    vcache[li, hh, slot, d] = qkv[q_dim + kv_dim + hh * head_dim + d]
            win = w.windows[li]
            attend_one(qkv, kcache[li], vcache[li], n_filled, c.scale, n_heads, n_kv, head_dim, b.scores, att,
                       kpos, posv[0] - win + 1 if win > 0 else 0)
            _mv(mask, wu8, t[K_O:K_O + 1], att, xsum, xn, b.offs1, chunks[1], starts, tmp, xq, xd, xsq, use_i8)
            if c.post_norms:
                o = vtab[li, V_POST_ATTN]
                _rmsnorm1(xn, vec[o:o + dim], eps, xn)
            for j in range(dim):
                x[j] += xn[j]
            o = vtab[li, V_FFN_NORM]
            _rmsnorm1(x, vec[o:o + dim], eps, xn)
            _mv(mask, wu8, t[K_GATE:K_UP + 1], xn, xsum, gu, b.offs2, chunks[2], starts, tmp, xq, xd, xsq, use_i8)
            if c.act == ACT_GELU:
                for j in range(n_ff):
                    gu[j] = gelu(gu[j]) * gu[n_ff + j]
            else:
                for j in range(n_ff):
                    gv = gu[j]
                    gu[j] = gv / (np.float32(1.0) + exp32(-gv)) * gu[n_ff + j]
            h = gu[:n_ff]
            _mv(mask, wu8, t[K_DOWN:K_DOWN + 1], h, xsum, xn, b.offs1, chunks[3], starts, tmp, xq, xd, xsq, use_i8)
            if c.post_norms:
                o = vtab[li, V_POST_FFN]
                _rmsnorm1(xn, vec[o:o + dim], eps, xn)
            for j in range(dim):
                x[j] += xn[j]
        out_norm, outt, logits, offs1 = w.out_norm, w.outt, b.logits, b.offs1
        _rmsnorm1(x, vec[out_norm:out_norm + dim], eps, xn)
        _mv(mask, wu8, outt.reshape((1, outt.shape[0])), xn, xsum, logits, offs1, chunks[4], starts, tmp,
            xq, xd, xsq, use_i8)

    return decode_step
