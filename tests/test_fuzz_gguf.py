"""Random-mutation fuzzing of the GGUF loader: thousands of mutants of a tiny valid model (bit flips,
32/64-bit fields overwritten with edge values, truncations, inserted and deleted bytes, NaN/inf
written into tensor data). Each mutant must either load and run (tokenize, detokenize, two
generated tokens through infer.LLM with a 16-token context; every 5th also `infer inspect`) or
raise an infer.InferError with a one-line message naming the file; any other exception, a crash
(the loop runs in a subprocess: a segfault is a failure) or a hang (a time limit per mutant and
overall) fails the test, with the seed of the mutant.

Seeded and reproducible: INFER_FUZZ_SEED (default 13) and INFER_FUZZ_N (default 3000) choose the
mutants; one mutant again, with its traceback:
    .venv/bin/python tests/test_fuzz_gguf.py --seed SEED --count 1 --dir /tmp/fuzz -v
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED = int(os.environ.get("INFER_FUZZ_SEED", 13))
N_MUTANTS = int(os.environ.get("INFER_FUZZ_N", 3000))
PER_MUTANT_S = 20.0        # a mutant that takes longer has hung
OVERALL_S = 600.0          # the whole loop (about 30 s for 3000 mutants when the kernels are cached)
INSPECT_EVERY = 5
STRUCTURAL = 0.3           # the share of mutants made on the keys and tensor infos, not the bytes

_I32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 48, 63, 64, 65, 127, 128, 255, 256, 271, 272, 273,
        4095, 4096, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
_I64 = _I32 + [2**32, 2**32 + 1, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
_NAN_INF = [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff"]


_BASE = []


def base_parts():
    """The tiny model's (kv, tensors), made once."""
    if not _BASE:
        from gguf_fixtures import tiny_model
        _BASE.extend(tiny_model())
    return _BASE


def base_model():
    """The tiny model's bytes, its fields (position, size, label), and where its tensor data starts."""
    from gguf_fixtures import gguf_bytes
    kv, ts = base_parts()
    fields = []
    data = gguf_bytes(kv, ts, fields=fields)
    infos_end = max(p + s for p, s, _ in fields)
    return data, fields, (infos_end + 31) // 32 * 32


def mutate(base: bytes, fields, data_start, rng: random.Random):
    """One mutant of `base` and a short description of what was done to it."""
    buf = bytearray(base)
    done = []

    def where():
        return rng.randrange(data_start if rng.random() < 0.85 else len(buf)) if buf else 0

    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.choices(("field", "bits", "int", "truncate", "insert", "delete", "nan"),
                         weights=(40, 15, 12, 8, 8, 8, 9))[0]
        if op == "field" and fields:
            label = rng.choice(sorted({f[2] for f in fields}))      # each kind of field equally often
            pos, size, label = rng.choice([f for f in fields if f[2] == label])
            if pos + size > len(buf):
                continue
            fmt = {1: "<B", 4: "<I", 8: "<Q"}.get(size)
            if fmt is None:
                continue
            old = struct.unpack_from(fmt, buf, pos)[0]
            if rng.random() < 0.3:
                v = (old + rng.choice((-32, -2, -1, 1, 2, 32, 4096))) % (1 << 8 * size)
            else:
                v = rng.choice(_I64 if size == 8 else _I32) % (1 << 8 * size)
            struct.pack_into(fmt, buf, pos, v)
            done.append(f"{label}@{pos}={v}")
        elif op == "bits":
            for _ in range(rng.randint(1, 4)):
                p = where()
                if p < len(buf):
                    buf[p] ^= 1 << rng.randrange(8)
                    done.append(f"flip@{p}")
        elif op == "int":
            size = rng.choice((4, 8))
            p = where()
            if p + size <= len(buf):
                v = rng.choice(_I64 if size == 8 else _I32) % (1 << 8 * size)
                struct.pack_into("<Q" if size == 8 else "<I", buf, p, v)
                done.append(f"u{8 * size}@{p}={v}")
        elif op == "truncate":
            p = where()
            del buf[p:]
            done.append(f"cut@{p}")
        elif op == "insert":
            p = where()
            n = rng.randint(1, 16)
            buf[p:p] = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.7 else b"\0" * n
            done.append(f"insert{n}@{p}")
        elif op == "delete":
            p = where()
            n = rng.randint(1, 16)
            del buf[p:p + n]
            done.append(f"delete{n}@{p}")
        elif op == "nan" and len(buf) > data_start + 8:
            b = rng.choice(_NAN_INF)
            p = rng.randrange(data_start, len(buf) - len(b))
            buf[p:p + len(b)] = b
            done.append(f"naninf@{p}")
    return bytes(buf), " ".join(done) or "none"


_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-5, 1e30, -1e30, float("nan"), float("inf"), float("-inf")]
_RANGES = {0: (0, 2**8), 1: (-2**7, 2**7), 2: (0, 2**16), 3: (-2**15, 2**15), 4: (0, 2**32),
           5: (-2**31, 2**31), 10: (0, 2**64), 11: (-2**63, 2**63)}


def _rand_scalar(rng, t):
    if t in (6, 12):
        return rng.choice(_FLOATS)
    if t == 7:
        return rng.random() < 0.5
    if t == 8:
        return rng.choice(["", "llama", "gpt2", "gpt-2", "x" * rng.randint(1, 80), "a b", "\n", "\u00e9"])
    lo, hi = _RANGES[t]
    v = rng.choice(_I64 + [-1, -2, -2**31, -2**63])
    return v if lo <= v < hi else lo + v % (hi - lo)


def _rand_value(rng):
    """(value type, value) of any GGUF type: scalars, strings, arrays (of 0, 1, 271..273 items),
    arrays of arrays, and (as raw bytes) arrays nested 2 to 5000 deep."""
    t = 9 if rng.random() < 0.4 else rng.randrange(13)
    if t != 9:
        return t, _rand_scalar(rng, t)
    it = 9 if rng.random() < 0.25 else rng.randrange(13)
    if it == 9:
        if rng.random() < 0.5:
            d = rng.choice((2, 8, 9, 100, 5000))
            return 9, struct.pack("<IQ", 9, 1) * (d - 1) + struct.pack("<IQ", 0, 1) + b"\x01"
        return 9, (9, [(8, ["a", "b"])] * rng.choice((0, 1, 272)))
    n = rng.choice((0, 1, 2, 271, 272, 273))
    return 9, (it, [_rand_scalar(rng, it) for _ in range(n)])


def mutate_structure(kv, ts, rng: random.Random):
    """A mutant made at the level of keys and tensor infos, then written out: a value replaced by
    one of another type (or an edge value of its own), keys dropped / repeated / reordered,
    tensor dims, types, offsets and names changed, tensors dropped or repeated."""
    from gguf_fixtures import RawTensor, gguf_bytes
    kv = list(kv)
    ts = [RawTensor(t.name, t.dims, t.type_id, t.data, t.offset) for t in ts]
    done = []
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.choice(("retype", "retype", "retype", "edge", "edge", "drop_kv", "dup_kv", "swap_kv", "dims",
                         "dims", "ttype", "offset", "tname", "drop_t", "dup_t"))
        i, j = rng.randrange(len(kv)), rng.randrange(len(ts))
        key, vt, v = kv[i]
        t = ts[j]
        if op == "retype":
            kv[i] = (key, *_rand_value(rng))
        elif op == "edge" and vt in _RANGES or vt in (6, 7, 8, 12):
            kv[i] = (key, vt, _rand_scalar(rng, vt))
        elif op == "drop_kv":
            del kv[i]
        elif op == "dup_kv":
            kv.insert(rng.randrange(len(kv) + 1), kv[i])
        elif op == "swap_kv":
            kv[i], kv[-1] = kv[-1], kv[i]
        elif op == "dims":
            k = rng.randrange(len(t.dims))
            t.dims[k] = rng.choice(_I64 + [t.dims[k] * 2, t.dims[k] // 2, t.dims[k] + 32])
            if rng.random() < 0.3:
                t.dims = t.dims[:rng.randrange(6)] + [1] * rng.randrange(3)
        elif op == "ttype":
            t.type_id = rng.choice((0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 15, 16, 29, 30, 31, 39, 40, 255, 2**31))
        elif op == "offset":
            t.offset = rng.choice(_I64 + [rng.randrange(0, len(t.data) + 64) // 32 * 32])
        elif op == "tname":
            t.name = rng.choice((ts[0].name, "", "x" * 63, "x" * 64, "blk.9.attn_q.weight", "\xff\xfe", "a\nb"))
        elif op == "drop_t":
            del ts[j]
        elif op == "dup_t":
            ts.insert(rng.randrange(len(ts) + 1), ts[j])
        done.append(f"{op}:{key if op.endswith('kv') or op in ('retype', 'edge') else t.name}")
    try:
        return gguf_bytes(kv, ts), " ".join(done)
    except (struct.error, OverflowError, UnicodeEncodeError):
        return gguf_bytes(*base_parts()), "none"


class MutantTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    # not inside a Numba compilation (a mutant whose tensor types give the model a new set of
    # block formats compiles that set's kernels, which can take longer than the limit on a cold
    # cache): interrupted there, the dispatcher is left half-built ("no compiled object yet" for
    # every later mutant); the check is deferred by a second until the compilation is done
    import signal

    from numba.core.compiler_lock import global_compiler_lock
    if global_compiler_lock._lock._is_owned():
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        return
    raise MutantTimeout()


def run_mutant(path, seed, inspect_too, main):
    """'ran' or the InferError's class name; anything else raises."""
    import contextlib
    import io

    import infer
    from infer.errors import InferError
    try:
        with infer.LLM(path, n_ctx=16, n_threads=1, seed=seed) as llm:
            ids = llm.tokenize("Hello world")
            llm.detokenize(ids)
            # greedy: sampling NaN logits (NaN/inf weights) raises ValueError in numpy's choice,
            # test_sampling_nan_logits below
            llm.generate("Hello", max_tokens=2, sampling=infer.SamplingParams.greedy())
        outcome = "ran"
    except InferError as e:
        msg = str(e)
        if "\n" in msg or str(path) not in msg:
            raise AssertionError(f"{type(e).__name__} message is not one line naming the file: {msg!r}") from None
        outcome = type(e).__name__
    if inspect_too:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["inspect", str(path)])
                code = 0
            except SystemExit as e:
                code = e.code or 0
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        want = 0 if outcome == "ran" else 1
        if code != want or (want and (len(lines) != 1 or not lines[0].startswith("error: "))):
            raise AssertionError(f"infer inspect exited {code} (generate: {outcome}), stderr {err.getvalue()!r}")
    return outcome


def child(seed0, count, workdir: Path, verbose=False):
    """The fuzz loop (run in a subprocess by the test). Writes progress.txt (the mutant being run)
    and report.json (outcomes, failures)."""
    import signal
    import traceback
    import warnings

    import logging
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from infer.cli import main as climain
    climain._register()
    climain._register = lambda: None
    base, fields, data_start = base_model()
    # the unmutated model first, with no time limit: it compiles (or loads) the kernels
    t_warm = time.perf_counter()
    (workdir / "base.gguf").write_bytes(base)
    if run_mutant(workdir / "base.gguf", 0, True, climain.main) != "ran":
        raise AssertionError("the unmutated tiny model does not run")
    t_warm = time.perf_counter() - t_warm
    outcomes, failures, slowest = {}, [], (0.0, None)
    signal.signal(signal.SIGALRM, _on_alarm)
    progress = open(workdir / "progress.txt", "w")
    t_all = time.perf_counter()
    for i in range(count):
        seed = seed0 + i
        rng = random.Random(seed)
        if rng.random() < STRUCTURAL:
            data, desc = mutate_structure(*base_parts(), rng)
        else:
            data, desc = mutate(base, fields, data_start, rng)
        path = workdir / f"mutant-{seed}.gguf"
        path.write_bytes(data)
        progress.seek(0)
        progress.write(f"{seed} {desc}\n")
        progress.truncate()
        progress.flush()
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, PER_MUTANT_S)
        try:
            outcome = run_mutant(path, seed, i % INSPECT_EVERY == 0, climain.main)
        except MutantTimeout:
            outcome = "failure"
            failures.append({"seed": seed, "mutation": desc, "error": f"took more than {PER_MUTANT_S} s"})
        except BaseException as e:  # noqa: BLE001 - the point is to catch everything
            outcome = "failure"
            failures.append({"seed": seed, "mutation": desc, "error": f"{type(e).__name__}: {e}"[:500],
                             "traceback": traceback.format_exc()[-3000:]})
            if verbose:
                traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t
        if dt > slowest[0]:
            slowest = (dt, seed)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if verbose:
            print(seed, desc, "->", outcome, f"{dt * 1000:.1f} ms")
        path.unlink()
    report = {"outcomes": outcomes, "failures": failures, "seconds": time.perf_counter() - t_all,
              "warm_up_seconds": t_warm, "slowest": slowest}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


def test_fuzz_gguf_mutants(tmp_path):
    cmd = [sys.executable, __file__, "--seed", str(SEED), "--count", str(N_MUTANTS), "--dir", str(tmp_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=OVERALL_S, env=env)
    except subprocess.TimeoutExpired:
        at = (tmp_path / "progress.txt").read_text().strip() if (tmp_path / "progress.txt").exists() else "?"
        pytest.fail(f"the fuzz loop took more than {OVERALL_S} s; running mutant (seed, mutation): {at}")
    if not (tmp_path / "report.json").exists():
        at = (tmp_path / "progress.txt").read_text().strip() if (tmp_path / "progress.txt").exists() else "?"
        pytest.fail(f"the fuzz process died (status {r.returncode}) at mutant (seed, mutation) {at}\n"
                    f"{r.stderr[-3000:]}")
    report = json.loads((tmp_path / "report.json").read_text())
    fails = report["failures"]
    assert not fails, (f"{len(fails)} of {N_MUTANTS} mutants failed; first: seed {fails[0]['seed']} "
                       f"({fails[0]['mutation']}): {fails[0]['error']}\n{fails[0].get('traceback', '')}\n"
                       f"seeds: {[f['seed'] for f in fails][:50]}")
    outcomes = report["outcomes"]
    print(f"fuzz: {N_MUTANTS} mutants in {time.perf_counter() - t:.1f} s (warm-up "
          f"{report['warm_up_seconds']:.1f} s): {outcomes}, slowest (s, seed) {report['slowest']}")
    if N_MUTANTS >= 1000:     # the mutants reach both ends: some still run, most are refused
        assert outcomes.get("ran", 0) > N_MUTANTS // 50
        assert sum(v for k, v in outcomes.items() if k != "ran") > N_MUTANTS // 2


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--count", type=int, default=N_MUTANTS)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    child(a.seed, a.count, a.dir, a.verbose)
    if a.verbose:
        print(json.loads((a.dir / "report.json").read_text()))


def test_sampling_nan_logits(tmp_path):
    import numpy as np

    import infer
    from gguf_fixtures import T_F16, tiny_model, write_raw
    from infer.errors import InferError
    kv, ts = tiny_model()
    out = next(t for t in ts if t.name == "output.weight")
    assert out.type_id == T_F16
    out.data = np.full(len(out.data) // 2, np.nan, np.float16).tobytes()
    with infer.LLM(write_raw(tmp_path / "nan.gguf", kv, ts), n_ctx=16, n_threads=1) as llm:
        # NaN/inf weights (the loader cannot see them without reading every weight): the sampler
        # refuses the non-finite logits with a one-line NumericError naming the file
        with pytest.raises(InferError, match="non-finite logits") as e:
            llm.generate("Hello", max_tokens=2, sampling=infer.SamplingParams(temperature=0.8, seed=1))
        assert str(e.value).startswith(str(tmp_path)) and "\n" not in str(e.value)
