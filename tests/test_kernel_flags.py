"""Every kernel is compiled with its own fastmath flags, whatever called it first.

Numba gives a function that leaves `fastmath` unset its first caller's flags (flags are inherited
through its ConfigStack), and keeps that compilation for the signature, in the process and in the
disk cache. The prompt quantizer's helper (blockir._quantize4) is shared by decode's quantizer
(compiled under fastmath decode kernels) and the prompt's: on a first run the decode kernels
compile first (in kernels.warmup's second process), so the prompt's one-row steps used a
reassociated sum and its several-row steps (another array layout, compiled later) the exact one:
the same token got other int8 activations depending on how many sequences shared its step
(tests/test_batch.py's 1t-int8 case failed in CI, on a cold cache only).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _njit_calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in ("njit", "jit"):
                yield node


def test_every_njit_names_its_fastmath():
    missing = []
    for d in ("runtime", "quant"):
        for p in sorted((ROOT / d).rglob("*.py")):
            for call in _njit_calls(p):
                if not any(k.arg == "fastmath" for k in call.keywords):
                    missing.append(f"{p.relative_to(ROOT)}:{call.lineno}")
    assert not missing, "njit without an explicit fastmath (it would inherit its caller's): " + ", ".join(missing)


_CHILD = r"""
import gc, json, os, re, sys
import numpy as np
import infer
from infer.kernels import blockir, simd, warmup
os.environ[warmup.CHILD] = "1"
path = sys.argv[1]
# the order of a first run: the decode step (exact path, one thread: kernels.warmup's work) first,
# then prompts and batched steps on int8 activations
with infer.LLM(path, n_ctx=128, n_threads=1, int8_activations=False) as llm:
    e = llm.engine
    e.reset()
    e.decode(1)
with infer.LLM(path, n_ctx=128, n_threads=1, int8_activations=True) as llm:
    llm.generate("The capital of France is", max_tokens=2)
rng = np.random.default_rng(0)
g = rng.standard_normal((4, 3072)).astype(np.float32)[:3, :1536]        # rows of a wider buffer
out = []
for h in (g, np.ascontiguousarray(g)):
    xq = np.zeros((1, 48, simd.MAXT, 32), np.int8)
    xg = np.zeros((1, 48, blockir.XG_FIELDS, simd.MAXT), np.float32)
    blockir.quantize_rows(h, xq, xg, False)
    out.append(xg[0, :, blockir.XG_S, :3].tolist())
from numba.core.registry import CPUDispatcher
wrong = []
for o in gc.get_objects():
    if not (isinstance(o, CPUDispatcher) and o.py_func.__module__.startswith("infer")):
        continue
    want = bool(o.targetoptions.get("fastmath"))
    short = o.py_func.__name__
    tag = f"{len(short)}{short}"
    for sig in o.signatures:
        try:
            text = o.inspect_llvm(sig)
        except Exception:
            continue
        # the function's own body (its IR module also holds the functions it links)
        body = "\n".join(b for b in text.split("\ndefine ")[1:]
                         if tag in b.split("\n")[0] and "cpython" not in b.split("\n")[0])
        if not re.search(r"\bf(?:add|sub|mul|div) ", body):
            continue
        has = bool(re.search(r"\bf(?:add|sub|mul|div) (?:fast|reassoc|nnan|ninf|nsz|arcp|contract|afn)", body))
        if has != want:
            wrong.append(f"{o.py_func.__module__}.{o.py_func.__qualname__} declared fastmath={want}")
print(json.dumps({"sums": out, "wrong": sorted(set(wrong))}))
"""


def test_first_callers_flags_do_not_leak(tmp_path, smollm2_path):
    """A cold cache, the first run's order: each kernel's code has its declared flags, and the
    prompt quantizer gives the exact float32 sums whatever the layout of its input."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(smollm2_path)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["wrong"] == []
    strided, contiguous = (np.array(s, np.float32) for s in res["sums"])
    assert np.array_equal(strided, contiguous)
    # sequential float32 sums of each group of 32 (the quantizer's order: 8 sums of 4, in two halves)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 3072)).astype(np.float32)[:3, :1536]
    want = np.zeros((48, 3), np.float32)
    for t in range(3):
        for b in range(48):
            half = [np.float32(0), np.float32(0)]
            for lane in range(8):
                s = np.float32(0)
                for i in range(4):
                    s = np.float32(s + g[t, 32 * b + 4 * lane + i])
                half[lane // 4] = np.float32(half[lane // 4] + s)
            want[b, t] = np.float32(half[0] + half[1])
    assert np.array_equal(contiguous, want)

