"""Perplexity and KL divergence, computed the way llama.cpp's `llama-perplexity` does.

    import infer
    r = infer.perplexity("model.gguf", Path("wiki.test.raw"), n_ctx=512)
    print(f"PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")

Method (llama-perplexity's, step for step):
  1. the whole text is tokenized once, with the vocabulary's own special-token rule (a BOS first
     only when tokenizer.add_bos); a text read from a file loses one trailing newline, as `-f` does;
  2. it is cut into n_chunks = n_tokens // n_ctx chunks of n_ctx tokens (the tail is dropped);
     at least 2 chunks are needed;
  3. each chunk runs in a fresh context; when add_bos, its first token is replaced by BOS;
  4. positions n_ctx/2 .. n_ctx-2 are scored, each against the next token (255 per 512-chunk),
     with a float64 log-softmax of those rows only;
  5. PPL = exp(mean NLL); its standard error is llama-perplexity's: ppl * sqrt(var(NLL) / (N-1)).

KL divergence against a base model (llama-perplexity's --kl-divergence-base / --kl-divergence, in a
compact form): `kl_base=FILE` stores, for every scored position, the base model's top-k log-probs
(token ids + values), the log of the remaining probability mass and the log-prob of the actual next
token, in an .npz (no pickle) written atomically. `kl=FILE` runs another model (e.g. a quantized
one) on the same tokens and compares: KL(base || model) over the top-k tokens plus one "rest"
bucket (a lower bound of the full-vocabulary KLD that is tight when top-k holds nearly all the
mass), its percentiles, same-top-token %, mean and RMS delta-p of the next token, and PPL ratio.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ContextError, InferError
from .npz_file import write_npz_atomic

log = logging.getLogger("infer")

KL_FORMAT = "infer-kl-base-1"
KL_TOP_K = 32
_ROWS = 32          # scored rows turned into float64 log-probs at a time (bounds the memory)


@dataclass(frozen=True)
class KLResult:
    """Comparison of a model against stored base log-probs (KL(base || model), per scored token)."""
    base_file: str
    n_tokens: int                  # scored tokens compared
    top_k: int                     # base log-probs stored per token (plus the rest's mass)
    ppl: float                     # this model's PPL on the compared tokens
    ppl_base: float                # the base model's PPL on the same tokens
    ppl_ratio: float               # PPL / PPL(base) = exp(mean ln(p_base / p))
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    mean_kld: float
    kld_stderr: float
    kld_percentiles: dict          # {"max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"}
    same_top_pct: float            # % of positions where both models' most likely token is the same
    same_top_stderr: float
    mean_dp: float                 # mean of p(next token) - p_base(next token)
    rms_dp: float                  # sqrt(mean((p - p_base)^2)), in probability (not %)
    kld: np.ndarray = field(repr=False)   # (n_tokens,) per-token KLD


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_stderr: float              # as llama-perplexity prints it after "+/-"
    n_ctx: int
    n_chunks: int
    n_tokens: int                  # tokens in the whole text
    n_tokens_scored: int           # n_chunks * (n_ctx - 1 - n_ctx // 2)
    tokens_per_s: float            # tokens run through the model per second of evaluation
    seconds: float                 # evaluation time (tokenizing and loading excluded)
    chunk_nll: np.ndarray = field(repr=False)   # (n_chunks,) sum of the NLL of each chunk's scored tokens
    token_nll: np.ndarray = field(repr=False)   # (n_tokens_scored,) NLL of every scored token, in order
    kl: KLResult | None = None

    @property
    def chunk_ppl(self) -> np.ndarray:
        """Running PPL after each chunk (what llama-perplexity prints as [1]x,[2]y,...)."""
        per = self.n_tokens_scored // max(1, self.n_chunks)
        return np.exp(np.cumsum(self.chunk_nll) / (per * np.arange(1, self.n_chunks + 1)))


def text_arg(text, caller: str) -> tuple[str, str]:
    """(text, source) from a text argument: a str or bytes is the text itself, a path
    (os.PathLike) is read with read_text."""
    if isinstance(text, (str, bytes)):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        return text, "text"
    if isinstance(text, os.PathLike):
        return read_text(text), os.fspath(text)
    raise InferError(f"{caller}() takes the text as str or a file path, not {type(text).__name__}")


def read_text(path) -> str:
    """A text file as llama-perplexity's -f reads it: the bytes, minus one trailing newline."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InferError(f"{p}: text file not found") from None
    except IsADirectoryError:
        raise InferError(f"{p}: is a directory, not a text file") from None
    except OSError as e:
        raise InferError(f"{p}: cannot read text file ({e.strerror})") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8", "surrogateescape")


def ppl_stats(token_nll) -> tuple[float, float]:
    """(PPL, its standard error) from per-token NLLs, exactly as llama-perplexity computes them."""
    nll = np.asarray(token_nll, np.float64)
    n = len(nll)
    mean = float(nll.sum() / n)
    ppl = math.exp(mean)
    var = float((nll * nll).sum() / n) - mean * mean
    err = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else float("nan")
    return ppl, err


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """float64 log-softmax of (m, n_vocab) float32 logits."""
    r = rows.astype(np.float64)
    r -= r.max(axis=1, keepdims=True)
    r -= np.log(np.exp(r).sum(axis=1, keepdims=True))
    return r


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    ok = np.isfinite(m)
    out = np.full(len(x), -np.inf)
    if ok.any():
        mm = m[ok]
        out[ok] = mm + np.log(np.exp(x[ok] - mm[:, None]).sum(axis=1))
    return out


def _top_k(logp: np.ndarray, k: int):
    """Top-k ids (descending log-prob), their log-probs, and the log of the remaining mass."""
    rows = np.arange(len(logp))[:, None]
    idx = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    order = np.argsort(-logp[rows, idx], axis=1, kind="stable")
    idx = idx[rows, order]
    top = logp[rows, idx]
    rest = logp.copy()
    rest[rows, idx] = -np.inf
    return idx, top, _logsumexp_rows(rest)


# --- the KL base file -----------------------------------------------------------------------------


class _KLBase:
    """Stored base log-probs, loaded and checked against this run."""

    KEYS = {"format": None, "n_ctx": np.integer, "n_vocab": np.integer, "tokens": np.integer,
            "topk_ids": np.integer, "topk_logp": np.floating, "rest_logp": np.floating,
            "target_logp": np.floating}

    def __init__(self, path):
        self.path = Path(path)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                missing = [k for k in self.KEYS if k not in z.files]
                if missing:
                    raise InferError(f"{self.path}: not an infer KL base file (missing {', '.join(missing)})")
                a = {k: z[k] for k in self.KEYS}
        except FileNotFoundError:
            raise InferError(f"{self.path}: KL base file not found (write it first with --kl-base)") from None
        except InferError:
            raise
        except (OSError, ValueError, EOFError) as e:
            raise InferError(f"{self.path}: not a readable KL base file ({e})") from None
        if str(a["format"]) != KL_FORMAT:
            raise InferError(f"{self.path}: unknown KL base format {str(a['format'])!r} (expected {KL_FORMAT})")
        for k, kind in self.KEYS.items():
            if kind is not None and not np.issubdtype(a[k].dtype, kind):
                raise InferError(f"{self.path}: KL base array {k!r} has dtype {a[k].dtype}")
        self.n_ctx, self.n_vocab = int(a["n_ctx"]), int(a["n_vocab"])
        self.tokens = a["tokens"].astype(np.int64)
        self.ids, self.top = a["topk_ids"].astype(np.int64), a["topk_logp"].astype(np.float64)
        self.rest, self.target = a["rest_logp"].astype(np.float64), a["target_logp"].astype(np.float64)
        per = self.n_ctx - 1 - self.n_ctx // 2
        n = len(self.target)
        if (self.n_ctx < 4 or self.tokens.ndim != 1 or len(self.tokens) % self.n_ctx or self.ids.ndim != 2
                or self.ids.shape != self.top.shape or len(self.ids) != n or len(self.rest) != n
                or n != per * (len(self.tokens) // self.n_ctx) or self.ids.shape[1] < 1
                or (n and (self.ids.min() < 0 or self.ids.max() >= self.n_vocab))):
            raise InferError(f"{self.path}: KL base file is inconsistent (array shapes do not match n_ctx "
                             f"{self.n_ctx})")
        self.n_chunks = len(self.tokens) // self.n_ctx
        self.per = per


class _KLWriter:
    def __init__(self, top_k):
        self.k = top_k
        self.ids, self.top, self.rest, self.target = [], [], [], []

    def add(self, logp, targets):
        idx, top, rest = _top_k(logp, self.k)
        self.ids.append(idx.astype(np.int32))
        self.top.append(top.astype(np.float32))
        self.rest.append(rest.astype(np.float32))
        self.target.append(logp[np.arange(len(logp)), targets].astype(np.float32))

    def save(self, path, n_ctx, n_vocab, tokens, model):
        write_npz_atomic(path, {
            "format": np.array(KL_FORMAT), "model": np.array(str(model)),
            "n_ctx": np.array(n_ctx, np.int64), "n_vocab": np.array(n_vocab, np.int64),
            "tokens": np.asarray(tokens, np.int32),
            "topk_ids": np.concatenate(self.ids), "topk_logp": np.concatenate(self.top),
            "rest_logp": np.concatenate(self.rest), "target_logp": np.concatenate(self.target)},
            "KL base file")


class _KLCompare:
    def __init__(self, base: _KLBase):
        self.base = base
        self.pos = 0
        self.kld, self.same, self.dp = [], [], []

    def add(self, logp, targets):
        b = self.base
        i, j = self.pos, self.pos + len(logp)
        self.pos = j
        rows = np.arange(len(logp))[:, None]
        ids, top, rest = b.ids[i:j], b.top[i:j], b.rest[i:j]
        q_top = logp[rows, ids]
        q = logp.copy()
        q[rows, ids] = -np.inf
        q_rest = _logsumexp_rows(q)
        p_top, p_rest = np.exp(top), np.exp(rest)
        kld = (p_top * (top - q_top)).sum(axis=1)
        has_rest = p_rest > 0
        kld[has_rest] += p_rest[has_rest] * (rest[has_rest] - q_rest[has_rest])
        self.kld.append(kld)
        self.same.append(logp.argmax(axis=1) == ids[:, 0])
        self.dp.append(np.exp(logp[np.arange(len(logp)), targets]) - np.exp(b.target[i:j]))

    def result(self, token_nll) -> KLResult:
        b = self.base
        n = len(token_nll)
        kld = np.concatenate(self.kld)
        same = np.concatenate(self.same).astype(np.float64)
        dp = np.concatenate(self.dp)
        base_nll = -b.target[:n]
        ppl, _ = ppl_stats(token_nll)
        ppl_base, _ = ppl_stats(base_nll)
        d = np.asarray(token_nll) - base_nll                   # ln(p_base / p) per token
        sd = lambda x: float(np.std(x) / math.sqrt(len(x) - 1)) if len(x) > 1 else float("nan")  # noqa: E731
        pct = {"max": float(kld.max())}
        for name, q in (("99.9", 99.9), ("99", 99), ("95", 95), ("90", 90), ("median", 50),
                        ("10", 10), ("5", 5), ("1", 1), ("0.1", 0.1)):
            pct[name] = float(np.percentile(kld, q))
        pct["min"] = float(kld.min())
        return KLResult(base_file=str(b.path), n_tokens=n, top_k=b.ids.shape[1], ppl=ppl, ppl_base=ppl_base,
                        ppl_ratio=float(math.exp(d.mean())), ln_ppl_ratio=float(d.mean()),
                        ln_ppl_ratio_stderr=sd(d), mean_kld=float(kld.mean()), kld_stderr=sd(kld),
                        kld_percentiles=pct, same_top_pct=100.0 * float(same.mean()),
                        same_top_stderr=100.0 * sd(same), mean_dp=float(dp.mean()),
                        rms_dp=float(math.sqrt((dp * dp).mean())), kld=kld)


# --- the run --------------------------------------------------------------------------------------
def perplexity(llm_or_path, text, n_ctx: int = 512, n_chunks: int | None = None, n_batch: int | None = None,
               progress: Callable[[int, int, float], None] | None = None, *, n_threads: int | None = None,
               kl_base=None, kl=None, kl_top_k: int = KL_TOP_K) -> PerplexityResult:
    """Perplexity of a model on a text, llama-perplexity's way (see the module docstring).

    llm_or_path: an infer.LLM (its n_ctx must be >= n_ctx) or a GGUF path (loaded with n_ctx,
        n_batch and n_threads, and closed afterwards).
    text: the text (str), or a path (pathlib.Path / os.PathLike) read as `-f` does (one trailing
        newline dropped).
    n_chunks: score only the first n_chunks chunks (default: all).
    progress: called after each chunk as progress(chunks_done, n_chunks, running_ppl).
    kl_base: write the base log-probs of this run to this .npz file (for a later `kl=`).
    kl: compare this run against the base log-probs in this .npz file (the text must tokenize to the
        same tokens, with the same n_ctx); the result's `kl` field holds the figures.
    """
    if kl_base is not None and kl is not None:
        raise InferError("give at most one of kl_base (write base log-probs) and kl (compare against them)")
    text, source = text_arg(text, "perplexity")
    n_ctx = int(n_ctx)
    if n_ctx < 4:
        raise InferError(f"n_ctx must be at least 4 (got {n_ctx})")
    if n_chunks is not None and int(n_chunks) < 1:
        raise InferError(f"n_chunks must be positive (got {n_chunks})")
    if n_batch is not None and int(n_batch) < 1:
        raise InferError(f"n_batch must be positive (got {n_batch})")
    if not int(kl_top_k) >= 1:
        raise InferError(f"kl_top_k must be positive (got {kl_top_k})")
    if not text:
        raise InferError(f"{source}: text is empty")
    if kl_base is not None and not Path(kl_base).parent.is_dir():
        raise InferError(f"{kl_base}: cannot write KL base file (no such directory)")
    base = _KLBase(kl) if kl is not None else None
    if base is not None and base.n_ctx != n_ctx:
        raise InferError(f"{base.path}: KL base was computed with n_ctx {base.n_ctx}, not {n_ctx} "
                         f"(use -c {base.n_ctx})")

    owned = not hasattr(llm_or_path, "logits")
    if owned:
        from .api import LLM
        # float32 activations: scores independent of the batch size (short batches would otherwise
        # take the int8 path of short prompts)
        llm = LLM(llm_or_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=int(n_batch or n_ctx),
                  int8_activations=False)
    else:
        llm = llm_or_path
        if llm.n_ctx < n_ctx:
            raise ContextError(f"{llm.path}: the model was loaded with n_ctx {llm.n_ctx}, smaller than the "
                               f"perplexity context {n_ctx}")
    try:
        return _run(llm, text, source, n_ctx, n_chunks, progress, base, kl_base, int(kl_top_k))
    finally:
        if owned:
            llm.close()


def _run(llm, text, source, n_ctx, n_chunks, progress, base, kl_base, kl_top_k):
    tok = llm.tokenizer
    tokens = tok.encode(text, add_bos=None)              # llama.cpp's add_special=true
    n_tokens = len(tokens)
    if n_tokens < 2 * n_ctx:
        raise ContextError(f"{source}: text has {n_tokens} tokens, fewer than the 2 chunks of {n_ctx} "
                           f"perplexity needs ({2 * n_ctx}); use a longer text or a smaller context (-c)")
    n_max = n_tokens // n_ctx
    requested = n_chunks
    n_chunks = n_max if requested is None else min(int(requested), n_max)
    if base is not None:
        if base.n_vocab != tok.n_vocab:
            raise InferError(f"{base.path}: KL base has a vocabulary of {base.n_vocab} tokens, this model "
                             f"{tok.n_vocab}")
        if n_chunks > base.n_chunks:
            if requested is not None:
                raise InferError(f"{base.path}: KL base holds {base.n_chunks} chunks, fewer than the "
                                 f"{n_chunks} asked for")
            n_chunks = base.n_chunks
        if not np.array_equal(base.tokens[:n_chunks * n_ctx], np.asarray(tokens[:n_chunks * n_ctx])):
            raise InferError(f"{base.path}: KL base was computed on other tokens (another text or "
                             f"vocabulary)")
    if kl_base is not None and kl_top_k > tok.n_vocab:
        raise InferError(f"kl_top_k {kl_top_k} is larger than the vocabulary ({tok.n_vocab} tokens)")
    writer = _KLWriter(kl_top_k) if kl_base is not None else None
    compare = _KLCompare(base) if base is not None else None

    first = n_ctx // 2
    per = n_ctx - 1 - first
    bos = tok.bos_id if tok.add_bos else None
    chunk_nll = np.zeros(n_chunks)
    token_nll = np.zeros(n_chunks * per)
    t0 = time.perf_counter()
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = llm.logits(chunk[:-1])                   # (n_ctx - 1, n_vocab): positions 0 .. n_ctx-2
        targets = np.asarray(chunk[first + 1:], np.int64)  # (per,)
        for r in range(0, per, _ROWS):
            logp = _log_softmax(logits[first + r:first + min(per, r + _ROWS)])
            tg = targets[r:r + len(logp)]
            token_nll[c * per + r:c * per + r + len(logp)] = -logp[np.arange(len(logp)), tg]
            if writer is not None:
                writer.add(logp, tg)
            if compare is not None:
                compare.add(logp, tg)
        chunk_nll[c] = token_nll[c * per:(c + 1) * per].sum()
        if progress is not None:
            progress(c + 1, n_chunks, math.exp(chunk_nll[:c + 1].sum() / ((c + 1) * per)))
    seconds = time.perf_counter() - t0
    ppl, err = ppl_stats(token_nll)
    if writer is not None:
        writer.save(kl_base, n_ctx, tok.n_vocab, tokens[:n_chunks * n_ctx], llm.path)
    log.info("perplexity %s: PPL %.4f +/- %.5f over %d chunks of %d (%.1f s)", source, ppl, err,
             n_chunks, n_ctx, seconds)
    return PerplexityResult(ppl=ppl, ppl_stderr=err, n_ctx=n_ctx, n_chunks=n_chunks, n_tokens=n_tokens,
                            n_tokens_scored=n_chunks * per,
                            tokens_per_s=n_chunks * (n_ctx - 1) / seconds if seconds > 0 else 0.0,
                            seconds=seconds, chunk_nll=chunk_nll, token_nll=token_nll,
                            kl=compare.result(token_nll) if compare is not None else None)


# `infer.perplexity` is both this module and the library call `infer.perplexity(model, text, ...)`:
# importing the module rebinds the attribute `infer.perplexity` to it, so the module itself is made
# callable (as infer.convert is) and can never shadow the function.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> PerplexityResult:
        return perplexity(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
