"""Session files: the state of an LLM's context saved to disk and loaded back.

A session file is a numpy .npz archive (read with allow_pickle=False: loading one runs no code)
holding
  header   JSON (as uint8 bytes): format name and version, the model's fingerprint (sha256 of the
           GGUF header, i.e. all metadata and the tensor table, plus samples of the tensor data),
           the model's shapes, the cache's counts and kind (linear or ring, size, sinks), the
           default sampling parameters, the session random generator's state, and the caller's
           own JSON data (`extra`: the REPL keeps its conversation there);
  tokens   (n_tokens,) int64: every token run through the context;
  k, v     (n_layers, n_kv_heads, n_filled, head_dim) float32: the filled part of the KV cache;
  kpos     (n_filled,) int64: the position each slot holds;
  sink_k   (ring caches) the sink keys at their original positions.
It is written to a temporary file in the same folder and renamed (a crash leaves the old file).
Loading checks everything before touching the context: a file from another model, a truncated
file, or counts that disagree are refused with a StateError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import InferError, StateError
from .npz_file import write_npz_atomic

FORMAT = "infer-session"
VERSION = 1
_SAMPLE = 1 << 20          # bytes of tensor data hashed at each end of the data section


def model_fingerprint(gf) -> str:
    """sha256 of a GGUF file's header (all metadata and the tensor table) and of the first and last
    MiB of its tensor data: cheap for any model size, and different for another model, another
    quantization or (almost surely) another fine-tune."""
    h = hashlib.sha256()
    h.update(b"%d:" % gf.size)
    h.update(gf.data[:gf.data_offset])
    data = gf.data[gf.data_offset:]
    h.update(data[:_SAMPLE])
    h.update(data[-_SAMPLE:])
    return h.hexdigest()


def _shapes(cfg) -> dict:
    return {"n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "n_vocab": cfg.n_vocab}


def save(path, llm, extra=None):
    path = Path(os.fspath(path))
    meta, arrays = llm.engine.get_state()
    header = {
        "format": FORMAT, "version": VERSION,
        "model": {"fingerprint": llm.fingerprint, "name": llm.config.name, "file": os.path.basename(llm.path)},
        "shapes": _shapes(llm.config),
        "cache": meta,
        "n_tokens": len(arrays["tokens"]),
        "sampling": dict(llm.sampling.__dict__),
        "rng": llm.rng.bit_generator.state,
        "extra": extra,
    }
    try:
        hb = json.dumps(header).encode()
    except (TypeError, ValueError) as e:
        raise InferError(f"{path}: session data is not JSON-serializable ({e})") from None
    write_npz_atomic(path, {"header": np.frombuffer(hb, np.uint8), **arrays}, "session file")


def load(path, llm):
    """Check the file against `llm` and load it; returns the saved `extra`."""
    path = os.fspath(path)
    try:
        return _load(path, llm)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None


def _load(path, llm):
    from .sampling import SamplingParams
    if not os.path.isfile(path):
        raise StateError("no such session file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise StateError("not an infer session file (no header)")
            try:
                header = json.loads(bytes(z["header"]).decode())
            except (ValueError, UnicodeDecodeError):
                raise StateError("corrupt session header") from None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise StateError("not an infer session file")
            if header.get("version") != VERSION:
                raise StateError(f"session format version {header.get('version')} (this infer reads {VERSION})")
            model = header.get("model") or {}
            if model.get("fingerprint") != llm.fingerprint:
                raise StateError(f"saved from another model ({model.get('file')!r}, {model.get('name')!r}), "
                                 f"not {os.path.basename(llm.path)!r}")
            if header.get("shapes") != _shapes(llm.config):
                raise StateError(f"model shapes {header.get('shapes')} differ from {_shapes(llm.config)}")
            meta = header.get("cache")
            if not isinstance(meta, dict):
                raise StateError("no cache description")
            arrays = {name: z[name] for name in z.files if name != "header"}
    except StateError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise StateError(f"truncated or corrupt session file ({type(e).__name__}: {e})") from None
    for name in ("tokens", "k", "v", "kpos"):
        if name not in arrays:
            raise StateError(f"missing array {name!r}")
    if len(arrays["tokens"]) != header.get("n_tokens"):
        raise StateError(f"{len(arrays['tokens'])} tokens stored, header says {header.get('n_tokens')}")
    try:
        sampling = SamplingParams(**header["sampling"])
        rng = np.random.default_rng()
        rng.bit_generator.state = header["rng"]
    except (InferError, TypeError, ValueError, KeyError) as e:
        raise StateError(f"bad sampler state ({e})") from None
    try:
        llm.engine.set_state(meta, arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"inconsistent cache description ({type(e).__name__}: {e})") from None
    llm.sampling, llm.rng = sampling, rng
    return header.get("extra")
