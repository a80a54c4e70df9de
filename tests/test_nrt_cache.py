"""Numba's runtime module from infer's object-code cache (kernels/nrt_cache.py): the first process
compiles and keeps it, later ones load it, and a damaged or foreign file is rebuilt, never loaded;
kernels from Numba's cache and new compilations that allocate (they link the runtime) still work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, numpy as np
import infer.kernels
from infer.kernels import nrt_cache
from infer.kernels.ops import rope_inv_freq
import numba

@numba.njit
def alloc(n):                          # arrays allocate through the runtime module
    a = np.arange(n) * 2.0
    b = [a[i] for i in range(n)]
    return a.sum() + len(b)

x = np.zeros(8, np.float64)
rope_inv_freq(16, 10000.0, x)
print(json.dumps({"status": nrt_cache.status, "alloc": alloc(10), "rope": x.tolist()}))
"""


def run(cache):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_nrt_object_cache(tmp_path):
    first = run(tmp_path)
    assert first["status"] == "compiled"
    files = list(tmp_path.glob("nrt-*.bin"))
    assert len(files) == 1
    expect = {"alloc": 100.0, "rope": [10000.0 ** (-2 * i / 16) for i in range(8)]}
    assert first["alloc"] == expect["alloc"]
    assert max(abs(a - b) for a, b in zip(first["rope"], expect["rope"])) < 1e-12

    second = run(tmp_path)
    assert second["status"] == "loaded" and second["alloc"] == 100.0 and second["rope"] == first["rope"]

    blob = bytearray(files[0].read_bytes())                  # one flipped bit in the object code
    blob[-40] ^= 0x10
    files[0].write_bytes(bytes(blob))
    third = run(tmp_path)
    assert third["status"] == "compiled" and third["alloc"] == 100.0 and third["rope"] == first["rope"]
    assert run(tmp_path)["status"] == "loaded"               # rebuilt whole

    files[0].write_bytes(files[0].read_bytes()[:100])        # cut short
    assert run(tmp_path)["status"] == "compiled"
    assert run(tmp_path)["status"] == "loaded"
