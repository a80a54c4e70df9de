"""Numba's runtime module (NRT) from an on-disk object-code cache instead of compiled at each start.

Numba compiles a small LLVM module of runtime helpers (reference counting, array allocation) the
first time anything is compiled or loaded from its cache, on every process start, even when every
kernel is a cache hit. That one compilation runs LLVM's whole optimisation and code generation
pipeline, which maps about 20 MiB of LLVM's code pages (27 of the 68 MiB of libllvmlite.so a warm
start keeps resident) and takes ~20 ms. Here it is compiled once, its object code kept next to the
kernels' cache (`numba.config.CACHE_DIR`), and later processes load it the way Numba loads a cached
kernel (`Codegen.unserialize_library`), which runs no optimiser.

The file is keyed on Numba's and llvmlite's versions, the code generator (triple, CPU, features)
and the module's IR text, and checked by a SHA-256 of its content: a stale, foreign or damaged file
is never loaded (it is rebuilt). Anything unexpected falls back to Numba's own compilation.
`install()` must run before Numba initialises its target (the first compilation or cache load);
afterwards it changes nothing.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile

_MAGIC = b"INFERNRT1\n"
_HEADER = struct.Struct("<32sQ")     # sha256 of the rest, length of the object code
status = "off"                        # "off" | "compiled" | "loaded" | "fallback: <reason>"


def _cache_dir():
    import numba
    d = getattr(numba.config, "CACHE_DIR", "") or os.environ.get("NUMBA_CACHE_DIR", "")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "infer")
    return d


def _read(path):
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _HEADER.size:
        return None
    digest, n_obj = _HEADER.unpack_from(blob, len(_MAGIC))
    body = blob[len(_MAGIC) + _HEADER.size:]
    if hashlib.sha256(body).digest() != digest or n_obj > len(body):
        return None
    return body[:n_obj], body[n_obj:]


def _write(path, obj, bitcode):
    body = obj + bitcode
    data = _MAGIC + _HEADER.pack(hashlib.sha256(body).digest(), len(obj)) + body
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".nrt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)           # readers see the old file or the whole new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def install():
    """Route Numba's NRT compilation through the cache (idempotent; a no-op if Numba lacks the
    hooks this relies on, or once its runtime is initialised)."""
    global status
    try:
        import llvmlite
        import numba
        from numba.core.runtime import nrtdynmod
    except ImportError:
        return
    original = getattr(nrtdynmod, "compile_nrt_functions", None)
    if original is None or getattr(original, "_infer_cached", False) \
            or not hasattr(nrtdynmod, "create_nrt_module"):
        return

    def compile_nrt_functions(ctx):
        global status
        try:
            ir_mod, library = nrtdynmod.create_nrt_module(ctx)
            codegen = ctx.codegen()
            key = hashlib.sha256(repr((numba.__version__, llvmlite.__version__, codegen.magic_tuple(),
                                       str(ir_mod))).encode()).hexdigest()[:24]
            path = os.path.join(_cache_dir(), f"nrt-{key}.bin")
        except Exception as e:                      # Numba's internals moved: its own way
            status = f"fallback: {type(e).__name__}: {e}"
            return original(ctx)
        found = _read(path)
        if found is not None:
            try:
                lib = codegen.unserialize_library((library.name, "object", found))
                status = "loaded"
                return lib
            except Exception as e:
                status = f"fallback: {type(e).__name__}: {e}"
                return original(ctx)
        library.enable_object_caching()
        library.add_ir_module(ir_mod)
        library.finalize()
        try:
            _name, kind, data = library.serialize_using_object_code()
            if kind == "object":
                _write(path, *data)
            status = "compiled"
        except Exception as e:                      # read-only cache: compiled, not kept
            status = f"compiled (not cached: {type(e).__name__}: {e})"
        return library

    compile_nrt_functions._infer_cached = True
    nrtdynmod.compile_nrt_functions = compile_nrt_functions
