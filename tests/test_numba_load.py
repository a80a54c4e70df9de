"""Numba's runtime module from infer's object-code cache (kernels/numba_load.py): the first process
compiles and keeps it, later ones load it, and a damaged or foreign file is rebuilt, never loaded;
kernels from Numba's cache and new compilations that allocate (they link the runtime) still work,
and a kernel loaded from the cache loads none of Numba's lowering registries (a compilation after
it does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys, numpy as np
import infer.kernels
from infer.kernels import numba_load
from infer.kernels.ops import rope_inv_freq
import numba

@numba.njit
def alloc(n):                          # arrays allocate through the runtime module
    a = np.arange(n) * 2.0
    b = [a[i] for i in range(n)]
    return a.sum() + len(b)

@numba.njit
def calls_cached(d):                   # a new compilation linking a kernel loaded from the cache
    y = np.zeros(d // 2, np.float64)
    rope_inv_freq(d, 10000.0, y)
    return y

x = np.zeros(8, np.float64)
rope_inv_freq(16, 10000.0, x)
registries = "numba.np.polynomial.polynomial_core" in sys.modules   # Numba's lowering registries loaded
lib = next(iter(rope_inv_freq.overloads.values())).library
lazy = "_infer_bitcode" in vars(lib) and lib._shared_module is None
linked = calls_cached(16).tolist()
print(json.dumps({"status": numba_load.status, "alloc": alloc(10), "rope": x.tolist(), "linked": linked,
                  "lazy": lazy, "registries": registries, "parsed": "_infer_bitcode" not in vars(lib) and lib._shared_module is not None}))
"""


def run(cache):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_nrt_object_cache(tmp_path):
    first = run(tmp_path)
    assert first["status"] == {"nrt": "compiled", "module": "compiled", "load": "light"}
    assert first["registries"]                               # rope_inv_freq compiled: they loaded
    files = list(tmp_path.glob("nrt-*.bin"))
    assert len(files) == 1 and len(list(tmp_path.glob("module-*.bin"))) == 1
    expect = {"alloc": 100.0, "rope": [10000.0 ** (-2 * i / 16) for i in range(8)]}
    assert first["alloc"] == expect["alloc"]
    assert max(abs(a - b) for a, b in zip(first["rope"], expect["rope"])) < 1e-12
    assert first["linked"] == first["rope"] and not first["lazy"]      # compiled here: nothing to defer

    second = run(tmp_path)
    assert second["status"] == {"nrt": "loaded", "module": "loaded", "load": "light"}
    assert second["alloc"] == 100.0 and second["rope"] == first["rope"]
    # loaded without Numba's registries; alloc and calls_cached then compiled (the compiler loads them)
    assert not second["registries"]
    # rope_inv_freq came from Numba's cache without its module; linking it into calls_cached parsed it
    assert second["lazy"] and second["parsed"] and second["linked"] == first["rope"]

    blob = bytearray(files[0].read_bytes())                  # one flipped bit in the object code
    blob[-40] ^= 0x10
    files[0].write_bytes(bytes(blob))
    third = run(tmp_path)
    assert third["status"]["nrt"] == "compiled" and third["status"]["module"] == "loaded" and third["alloc"] == 100.0 and third["rope"] == first["rope"]
    assert run(tmp_path)["status"]["nrt"] == "loaded"        # rebuilt whole

    files[0].write_bytes(files[0].read_bytes()[:100])        # cut short
    assert run(tmp_path)["status"]["nrt"] == "compiled"
    mod = next(tmp_path.glob("module-*.bin"))
    mod.write_bytes(mod.read_bytes()[:-1] + b"x")            # the codegen module's object, damaged
    r = run(tmp_path)
    assert r["status"]["nrt"] == "loaded" and r["status"]["module"] == "compiled" and r["rope"] == first["rope"]
    assert run(tmp_path)["status"] == {"nrt": "loaded", "module": "loaded", "load": "light"}
