"""Calibration: run a model in float on a text and collect its importance matrix.

    import infer
    im = infer.calibrate("model-f16.gguf", Path("calibration.txt"), n_ctx=512)
    im.save("model.imatrix.npz")
    infer.convert("hf-folder/", "model-q4_0.gguf", type="q4_0", imatrix=im)

Method (llama.cpp's imatrix tool's): the text is tokenized once and cut into chunks of n_ctx tokens
(a last, shorter chunk is kept when it has at least 16 tokens); each chunk runs in a fresh context
(its first token replaced by BOS when the vocabulary adds one) and the activations entering every
matmul of every token are accumulated: per input channel, the sum of squares and the count
(quant/imatrix.py). The model should be a float GGUF (f32, f16, bf16): statistics are then those of
the weights being quantized, not of an already-quantized copy (a quantized model works, with a
warning).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from infer.quant.imatrix import ImportanceMatrix

from .errors import ContextError, InferError
from .perplexity import read_text, text_arg

log = logging.getLogger("infer")

MIN_TAIL = 16          # a last chunk shorter than this is dropped


def model_identity(cfg, path="", weights="") -> dict:
    return {"arch": cfg.arch, "n_layers": cfg.n_layers, "n_embd": cfg.dim, "n_ff": cfg.n_ff,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_vocab": cfg.n_vocab,
            "name": cfg.name, "file": os.path.basename(str(path)), "weights": weights}


def calibrate(llm_or_path, text, n_ctx: int = 512, n_chunks: int | None = None,
              progress: Callable[[int, int], None] | None = None, *, n_threads: int | None = None,
              n_batch: int | None = None) -> ImportanceMatrix:
    """The importance matrix of a model on a text (see the module docstring).

    llm_or_path: an infer.LLM or a GGUF path (loaded with n_ctx and closed afterwards).
    text: the text (str), or a path (pathlib.Path / os.PathLike) read as `infer perplexity -f` does.
    n_chunks: use only the first n_chunks chunks (default: all).
    progress: called after each chunk as progress(chunks_done, n_chunks).
    """
    text, source = text_arg(text, "calibrate")
    n_ctx = int(n_ctx)
    if n_ctx < MIN_TAIL:
        raise InferError(f"n_ctx must be at least {MIN_TAIL} (got {n_ctx})")
    if n_chunks is not None and int(n_chunks) < 1:
        raise InferError(f"n_chunks must be positive (got {n_chunks})")
    if not text:
        raise InferError(f"{source}: text is empty")
    owned = not hasattr(llm_or_path, "model")
    if owned:
        from .api import LLM
        llm = LLM(llm_or_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=int(n_batch or n_ctx),
                  int8_activations=False)
    else:
        llm = llm_or_path
        if llm.n_ctx < n_ctx:
            raise ContextError(f"{llm.path}: the model was loaded with n_ctx {llm.n_ctx}, smaller than the "
                               f"calibration context {n_ctx}")
    try:
        return _run(llm, text, source, n_ctx, n_chunks, progress)
    finally:
        if owned:
            llm.close()


def _run(llm, text, source, n_ctx, n_chunks, progress):
    tok = llm.tokenizer
    tokens = tok.encode(text, add_bos=None)
    chunks = [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)]
    if chunks and len(chunks[-1]) < MIN_TAIL:
        chunks.pop()
    if not chunks:
        raise ContextError(f"{source}: text has {len(tokens)} tokens, fewer than the {MIN_TAIL} calibration needs")
    if n_chunks is not None:
        chunks = chunks[:int(n_chunks)]
    types = sorted({t.qtype.name for t in llm._gf.tensors.values() if len(t.shape) == 2})
    weights = "/".join(types)
    if any(t not in ("F32", "F16", "BF16") for t in types):
        log.warning("%s: calibrating a quantized model (%s); a float (f16/bf16/f32) model gives the statistics "
                    "of the weights being quantized", llm.path, weights)
    cfg = llm.config
    im = ImportanceMatrix(model=model_identity(cfg, llm.path, weights))
    model = llm.model
    bos = tok.bos_id if tok.add_bos else None
    t0 = time.perf_counter()
    n_run = 0
    model.observer = im.add
    try:
        for i, chunk in enumerate(chunks):
            chunk = list(chunk)
            if bos is not None:
                chunk[0] = bos
            llm.logits(chunk)
            n_run += len(chunk)
            if progress is not None:
                progress(i + 1, len(chunks))
    finally:
        model.observer = None
    im.source = {"text": os.path.basename(source) if source != "text" else "text", "n_ctx": n_ctx,
                 "n_chunks": len(chunks), "n_tokens": n_run}
    log.info("calibrate %s: %d tokens in %d chunks, %d tensors (%.1f s)", source, n_run, len(chunks), len(im),
             time.perf_counter() - t0)
    return im


def float_type_for(plan) -> str:
    """The float type a checkpoint is calibrated in: bf16 when its matrices are all bf16 (lossless),
    else f16."""
    mats = [t for t in plan.tensors if t.src is not None and len(t.shape) == 2]
    return "bf16" if mats and all(t.src.dtype == "BF16" for t in mats) else "f16"


def convert_calibrated(src, dst, type: str, text, *, n_ctx: int = 512, n_chunks: int | None = None,
                       force: bool = False, n_threads: int | None = None, imatrix_out=None,
                       calib_progress: Callable[[int, int], None] | None = None, progress=None):
    """`infer convert SRC -o DST --type TYPE --calibrate TEXT` as a library call: convert the Hugging
    Face folder `src` to a temporary float GGUF (bf16 or f16, next to dst), calibrate it on `text`,
    then write dst with the importance matrix (q4_0, q4_1, q4_0_mixed, q4_1_mixed). The temporary
    file is always removed. Returns (ConvertSummary, ImportanceMatrix); imatrix_out also saves the
    matrix. Needs free disk space for the float copy (2 bytes per weight)."""
    from infer.convert.pipeline import (ConvertSummary, _check_dst, attach_imatrix, make_plan,
                                        write_plan)
    from infer.errors import ConvertError
    t0 = time.perf_counter()
    dst = Path(dst)
    _check_dst(dst, force)
    plan = make_plan(src, type)
    try:
        if not any(t.qtype.name in ("Q4_0", "Q4_1") for t in plan.tensors):
            raise ConvertError(f"--type {plan.recipe.name} has no Q4_0/Q4_1 tensors: calibration only applies "
                               f"to q4_0, q4_1 and the mixed recipes")
        if not isinstance(text, (str, bytes)) and not read_text(text):
            raise InferError(f"{text}: text is empty")
        ftype = float_type_for(plan)
        tmp = dst.parent / f".{dst.name}.{os.getpid()}.calib-{ftype}.gguf"
        try:
            fplan = make_plan(src, ftype)
            try:
                write_plan(fplan, tmp, force=True)
            finally:
                fplan.checkpoint.close()
            im = calibrate(tmp, text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
                           progress=calib_progress)
        finally:
            tmp.unlink(missing_ok=True)
        im.model["file"] = Path(src).name
        if imatrix_out is not None:
            im.save(imatrix_out)
        attach_imatrix(plan, im)
        write_plan(plan, dst, force=force, progress=progress)
    finally:
        plan.checkpoint.close()
    return (ConvertSummary(Path(src), dst, plan.recipe.name, plan.spec.gguf_arch, len(plan.tensors),
                           plan.file_size, time.perf_counter() - t0, False, plan.vocab, plan.tensors), im)


# `infer.calibrate` is both this module and the library call `infer.calibrate(model, text, ...)`
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> ImportanceMatrix:
        return calibrate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
