"""How Numba's cached code is loaded: changes that cut a warm start's memory by ~30 MiB.

1. Numba's runtime module (NRT) from an on-disk object-code cache instead of compiled at each
   start. Numba compiles a small LLVM module of runtime helpers (reference counting, array
   allocation) the first time anything is compiled or loaded from its cache, on every process
   start, even when every kernel is a cache hit. That one compilation runs LLVM's optimisation and
   code generation pipeline, which maps ~20 MiB of LLVM's code pages (27 of the 68 MiB of
   libllvmlite.so a warm start kept resident) and takes ~20 ms. Here it is compiled once, its
   object code kept next to the kernels' cache (`numba.config.CACHE_DIR`), and later processes load
   it the way Numba loads a cached kernel (`Codegen.unserialize_library`), which runs no optimiser.
   The code generator's own module (empty) was compiled at the same first step, which alone
   mapped ~6 MiB more of LLVM's code: its object code comes from the cache too, through the
   object-cache hook Numba installs for its libraries.
   Each file is keyed on Numba's and llvmlite's versions, the code generator (triple, CPU,
   features) and the module's IR text, and checked by a SHA-256 of its content: a stale, foreign
   or damaged file is never loaded (it is rebuilt). Anything unexpected falls back to Numba's own
   compilation.
2. A kernel loaded from Numba's cache carries, besides its machine code, its LLVM bitcode, which
   Numba parses into an in-memory module at once and keeps for the rare case that a later
   compilation links the kernel in (an @njit function calling it). Parsed, the decode step and the
   kernels it links hold ~5 MiB; here the bitcode bytes are kept instead and parsed when a
   compilation first asks for the module (`_get_module_for_linking`).

3. Loading a cached kernel first "refreshes" Numba's target context: it imports and registers
   every lowering implementation Numba has (linalg, random generators, polynomials, typed
   containers, jitclass, datetime: ~0.17-0.29 s of a warm start, most of what Numba costs after
   its import), which only a compilation uses. The one part loaded machine code needs, the
   runtime (NRT) initialisation, runs here before a load; the registries load when something
   compiles (Numba's compiler refreshes the context itself) or when a load goes the slow way.

`install()` must run before Numba initialises its target (the first compilation or cache load);
each change is skipped if Numba lacks the internals it relies on.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile

_MAGIC = b"INFERNRT1\n"
_HEADER = struct.Struct("<32sQ")     # sha256 of the rest, length of the object code
status: dict = {}    # "nrt", "module": "compiled" | "loaded" | "fallback: <reason>" (tests, diagnostics)


def _cache_dir():
    """The kernels' cache directory (infer sets NUMBA_CACHE_DIR on import; see infer/__init__.py),
    or "" when there is none (no home directory): then Numba's own path runs."""
    import numba
    return getattr(numba.config, "CACHE_DIR", "") or os.environ.get("NUMBA_CACHE_DIR", "")


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


class _ObjectSlot:
    """Stands for a library in Numba's object-cache hooks (CPUCodeLibrary._object_getbuffer_hook
    and _object_compiled_hook look a module's library up by this attribute): hands LLVM the
    cached object code of the code generator's own empty module, or receives it once compiled."""
    _object_caching_enabled = True
    _compiled = False

    def __init__(self, obj):
        self._compiled_object = obj


def _key(what, ir_text, codegen):
    import llvmlite
    import numba
    return hashlib.sha256(repr((what, numba.__version__, llvmlite.__version__, codegen.magic_tuple(),
                                ir_text)).encode()).hexdigest()[:24]


def _serve_codegen_module(codegen):
    """The code generator's module (empty; every process's first machine-code step compiled it,
    which alone mapped ~6 MiB of LLVM's code): from the cache, through the object-cache hook.
    Returns (path, slot) when it will be compiled here, to be written afterwards."""
    mod = getattr(codegen, "_llvm_module", None)
    attr = "_CPUCodeLibrary__library"          # the name the hooks read (private, so mangled)
    if mod is None or hasattr(mod, attr) or any(True for _ in mod.functions) \
            or any(True for _ in mod.global_variables):
        return None
    path = os.path.join(_cache_dir(), f"module-{_key('codegen module', str(mod), codegen)}.bin")
    found = _read(path)
    setattr(mod, attr, _ObjectSlot(found[0] if found else None))
    status["module"] = "loaded" if found else "compiled"
    return None if found else (path, getattr(mod, attr))


def install():
    """Route Numba's NRT compilation through the cache (idempotent; a no-op if Numba lacks the
    hooks this relies on, or once its runtime is initialised)."""
    try:
        from numba.core.runtime import nrtdynmod
    except ImportError:
        return
    original = getattr(nrtdynmod, "compile_nrt_functions", None)
    if original is None or getattr(original, "_infer_cached", False) \
            or not hasattr(nrtdynmod, "create_nrt_module"):
        return

    def compile_nrt_functions(ctx):
        if not _cache_dir():
            status["nrt"] = "off: no cache directory"
            return original(ctx)
        try:
            ir_mod, library = nrtdynmod.create_nrt_module(ctx)
            codegen = ctx.codegen()
            path = os.path.join(_cache_dir(), f"nrt-{_key('nrt', str(ir_mod), codegen)}.bin")
            pending = _serve_codegen_module(codegen)
        except Exception as e:                      # Numba's internals moved: its own way
            status["nrt"] = f"fallback: {type(e).__name__}: {e}"
            return original(ctx)
        found = _read(path)
        if found is not None:
            try:
                lib = codegen.unserialize_library((library.name, "object", found))
                status["nrt"] = "loaded"
            except Exception as e:
                status["nrt"] = f"fallback: {type(e).__name__}: {e}"
                lib = original(ctx)
        else:
            library.enable_object_caching()
            library.add_ir_module(ir_mod)
            library.finalize()
            lib = library
            try:
                _name, kind, data = library.serialize_using_object_code()
                if kind == "object":
                    _write(path, *data)
                status["nrt"] = "compiled"
            except Exception as e:                  # read-only cache: compiled, not kept
                status["nrt"] = f"compiled (not cached: {type(e).__name__}: {e})"
        if pending is not None and pending[1]._compiled_object:
            try:
                _write(pending[0], pending[1]._compiled_object, b"")
            except Exception:
                pass
        return lib

    compile_nrt_functions._infer_cached = True
    nrtdynmod.compile_nrt_functions = compile_nrt_functions
    _lazy_linking_modules()
    _light_cache_loads()


def _light_cache_loads():
    try:
        from numba.core.caching import Cache
        from numba.core.runtime import rtsys
    except ImportError:
        return
    original = Cache.__dict__.get("load_overload")
    if original is None or getattr(original, "_infer_light", False) \
            or not hasattr(Cache, "_load_overload") or not hasattr(Cache, "_guard_against_spurious_io_errors"):
        return

    def load_overload(self, sig, target_context):
        try:
            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                found = self._load_overload(sig, target_context)
            status["load"] = "light"
        except Exception as e:                      # Numba's internals moved: its own way
            status["load"] = f"fallback: {type(e).__name__}: {e}"
            return original(self, sig, target_context)
        return found

    load_overload._infer_light = True
    Cache.load_overload = load_overload


def _lazy_linking_modules():
    try:
        import llvmlite.binding as ll
        from numba.core.codegen import CPUCodeLibrary
    except ImportError:
        return
    unserialize = CPUCodeLibrary.__dict__.get("_unserialize")
    for_linking = CPUCodeLibrary.__dict__.get("_get_module_for_linking")
    if not isinstance(unserialize, classmethod) or for_linking is None \
            or getattr(for_linking, "_infer_lazy", False):
        return
    load = unserialize.__func__

    def _unserialize(cls, codegen, state):
        lib = load(cls, codegen, state)
        kind, data = state[1], state[2]
        if kind == "object" and getattr(lib, "_shared_module", None) is not None:
            lib._infer_bitcode = data[1]        # symbols are registered: the module can go
            lib._shared_module = None
        return lib

    def _get_module_for_linking(self):
        bitcode = self.__dict__.pop("_infer_bitcode", None)
        if bitcode is not None and self._shared_module is None:
            self._shared_module = ll.parse_bitcode(bitcode)
        return for_linking(self)

    _get_module_for_linking._infer_lazy = True
    CPUCodeLibrary._unserialize = classmethod(_unserialize)
    CPUCodeLibrary._get_module_for_linking = _get_module_for_linking
