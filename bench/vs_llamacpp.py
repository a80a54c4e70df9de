"""infer and llama.cpp side by side, in one run, on the same GGUF files and thread counts.

    python bench/vs_llamacpp.py [--threads 1,2] [--pp 128] [--tg 64] [--rounds 3] [--reps 3]
                                [--model LABEL=PATH ...] [--peers bench,binding]
                                [--llama-bench PATH] [--peer-python PY] [--json OUT.json]

Prints a markdown table: per model and thread count, prefill (pp) and decode (tg) tokens/s of
infer and of each llama.cpp peer with the ratio infer / llama.cpp, the decode GB/s and its share of
this machine's read bandwidth (measured in the same run, before and after the models: best of
both), and the peak RSS of each runtime's process.

The llama.cpp peers (--peers, comma-separated; default `bench` when the llama-bench binary exists,
else `binding`):
  * bench: NATIVE llama-bench (--llama-bench PATH, default $LLAMA_BENCH or
    /work/llamacpp/bin/llama-bench), per round `llama-bench -m FILE -p PP -n TG -t T -fa 1
    -r REPS -o json` (its own warm-up, then REPS runs of each test; its avg/samples of tokens/s per
    test are parsed from the JSON; its tokens are its own random ids). Run from a small Python
    worker, so the peak RSS is llama-bench's (getrusage of the worker's only child). What issue 14's
    speed must-show compares against: `--peers bench --threads 1,2 --pp 128 --tg 64`;
  * binding: llama-cpp-python through --peer-python (default /work/peer/python if it exists, else
    this interpreter), as below.

Method (the same for infer and the binding; each measured in a subprocess of its own, so threads,
caches and peak RSS are isolated):
  * the same token ids (random, fixed seed, drawn here and passed to both workers);
  * llama-cpp-python: Llama(path, n_ctx=max(pp, tg) + 16, n_batch=n_ubatch=512, n_threads=
    n_threads_batch=t, flash_attn=True (its fastest setting on CPU), use_mmap=True); infer:
    infer.LLM(path, n_ctx=..., n_threads=t, n_batch=512);
  * pp: fresh KV cache (`Llama.reset()` / `engine.reset()`), then the p prompt tokens in one call
    (`Llama.eval(tokens)` / `engine.prefill(tokens)`), logits of the last token only; tok/s =
    p / wall time of that call;
  * tg: fresh KV cache, t single-token calls from position 0 (`Llama.eval([tok])` /
    `engine.decode(tok)`), no sampling on either side; tok/s = n / wall time. This is llama-bench's
    tg test, through each runtime's Python API (the binding's per-call overhead counts, as it does
    for a user of the binding; small next to a token's milliseconds on either side). llama.cpp's
    llama_perf_context counters are not used: in 0.3.36 their reset does not clear them;
  * each worker does one warm-up of each test, then --reps measured runs; a worker per runtime per
    round, the runtimes alternating which goes first (infer first in even rounds, last in odd
    ones); --rounds rounds; figures are medians over all rounds x reps;
  * decode GB/s = bytes of weights one token reads (all tensors but the token-embedding table,
    unless it is the output head) x tg tok/s; KV-cache reads not counted.
Run it on a quiet machine; pin with taskset to measure given cores (children inherit the affinity).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DEFAULT_MODELS = [
    ("SmolLM2-135M f16", "/work/models/bench/ours-f16.gguf"),
    ("SmolLM2-135M q8_0", "/work/models/bench/ours-q8_0.gguf"),
    ("SmolLM2-135M q4_0", "/work/models/bench/ours-q4_0.gguf"),
    ("SmolLM2-135M q4_1", "/work/models/bench/ours-q4_1.gguf"),
    ("synthetic 1.1B q8_0", "/work/models/synth/synth-1.1b-q8_0.gguf"),
    ("synthetic 1.1B q4_0", "/work/models/synth/synth-1.1b-q4_0.gguf"),
    ("Qwen2.5-Coder-0.5B Q4_K_M", "/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("Qwen2.5-Coder-1.5B Q4_K_M", "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
]
DEFAULT_LLAMA_BENCH = "/work/llamacpp/bin/llama-bench"
DEFAULT_PEER_PYTHON = "/work/peer/python"
PEERS = {"bench": "llama-bench", "binding": "llama-cpp-python"}
HOW_TO_MAKE = ("SmolLM2 files: infer convert /work/models/smollm2-hf -o FILE --type f16|q8_0|q4_0|q4_1; "
               "synthetic: python bench/make_synthetic.py /work/models/synth; Qwen2.5-Coder Q4_K_M: "
               "python ../shared/fixtures/qwen_coder.py /work/models")


# --- workers (run in their own process; print one JSON line) ---------------------------------------
def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_infer(a) -> dict:
    t0 = time.perf_counter()
    import infer
    from infer.bench import set_threads, threading_layer, time_decode, time_prefill
    toks = [int(x) for x in a.tokens.split(",")]
    llm = infer.LLM(a.model, n_ctx=max(a.pp, a.tg) + 16, n_threads=a.threads, n_batch=512)
    load = time.perf_counter() - t0
    e = llm.engine
    set_threads(a.threads, e)
    pp, ttft, tg = [], [], []
    if a.pp:
        time_prefill(e, toks[:a.pp])
    if a.tg:
        time_decode(e, toks[:min(a.tg, 16)])
    for _ in range(a.reps):
        if a.pp:
            s, f = time_prefill(e, toks[:a.pp])
            pp.append(a.pp / s)
            ttft.append(f)
        if a.tg:
            tg.append(a.tg / time_decode(e, toks[:a.tg]))
    return {"pp": pp, "tg": tg, "ttft": ttft, "load_s": load, "peak_rss": _peak_rss(),
            "threading_layer": threading_layer()}


def worker_llama(a) -> dict:
    t0 = time.perf_counter()
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import Llama
    toks = [int(x) for x in a.tokens.split(",")]
    ll = Llama(model_path=a.model, n_ctx=max(a.pp, a.tg) + 16, n_batch=512, n_ubatch=512,
               n_threads=a.threads, n_threads_batch=a.threads, flash_attn=True, use_mmap=True,
               logits_all=False, verbose=False)
    load = time.perf_counter() - t0
    n_vocab = ll.n_vocab()
    cctx = ll._ctx.ctx

    def prefill(p):
        ll.reset()
        t0 = time.perf_counter()
        ll.eval(p)
        llama_cpp.llama_synchronize(cctx)         # (CPU compute is synchronous already)
        t1 = time.perf_counter()
        logits = np.ctypeslib.as_array(ctypes.cast(ll._ctx.get_logits_ith(-1), ctypes.POINTER(ctypes.c_float)),
                                       shape=(n_vocab,))
        int(np.argmax(logits))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    def decode(g):
        ll.reset()
        ev = ll.eval
        t0 = time.perf_counter()
        for t in g:
            ev([t])
        llama_cpp.llama_synchronize(cctx)
        return time.perf_counter() - t0

    pp, ttft, tg = [], [], []
    if a.pp:
        prefill(toks[:a.pp])
    if a.tg:
        decode(toks[:min(a.tg, 16)])
    for _ in range(a.reps):
        if a.pp:
            s, f = prefill(toks[:a.pp])
            pp.append(a.pp / s)
            ttft.append(f)
        if a.tg:
            tg.append(a.tg / decode(toks[:a.tg]))
    return {"pp": pp, "tg": tg, "ttft": ttft, "load_s": load, "peak_rss": _peak_rss(),
            "version": llama_cpp.__version__}


def worker_llamabench(a) -> dict:  # --llama-bench carries the binary
    import resource
    cmd = [a.llama_bench, "-m", a.model, "-t", str(a.threads), "-fa", "1", "-r", str(a.reps), "-o", "json"]
    cmd += ["-p", str(a.pp)] if a.pp else ["-p", "0"]
    cmd += ["-n", str(a.tg)] if a.tg else ["-n", "0"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"llama-bench exited with {p.returncode}: {tail}")
    tests = json.loads(p.stdout)
    out = {"pp": [], "tg": [], "ttft": [], "load_s": None, "wall_s": wall, "command": cmd,
           "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    for t in tests:
        key = "pp" if t["n_prompt"] and not t["n_gen"] else "tg" if t["n_gen"] and not t["n_prompt"] else None
        if key:
            out[key] += [float(x) for x in (t.get("samples_ts") or [t["avg_ts"]])]
            out[key + "_avg_ts"] = float(t["avg_ts"])
    if tests:
        t = tests[0]
        out["version"] = f"build {t.get('build_number')} ({t.get('build_commit')})"
        out["cpu_info"] = t.get("cpu_info")
        out["flash_attn"] = t.get("flash_attn")
    return out


def worker_membw(a) -> dict:      # --tokens carries the thread counts, --pp the MiB
    from infer.bench import measure_read_bandwidth
    bw = measure_read_bandwidth([int(x) for x in a.tokens.split(",")], a.pp)
    return {str(k): v for k, v in bw.items()}


# --- the orchestrator -----------------------------------------------------------------------------
WORKER_ENV = dict(os.environ)


def run_worker(python: str, kind: str, model: str, threads: int, pp: int, tg: int, reps: int,
               tokens: list[int], timeout: float, llama_bench: str | None = None) -> dict:
    cmd = [python, str(HERE), "--worker", kind, "--model", model, "--threads", str(threads),
           "--pp", str(pp), "--tg", str(tg), "--reps", str(reps), "--tokens", ",".join(map(str, tokens))]
    if llama_bench:
        cmd += ["--llama-bench", llama_bench]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=WORKER_ENV)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{kind} worker failed on {model} ({threads} threads): {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _med(xs):
    return statistics.median(xs) if xs else 0.0


def measure_bandwidth(python: str, threads: list[int], mb: int) -> dict:
    try:
        return run_worker(python, "membw", "-", 0, mb, 0, 0, threads, timeout=600)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
        print(f"warning: read bandwidth not measured: {e}", file=sys.stderr)
        return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens of the prefill test (default 128)")
    ap.add_argument("--tg", type=int, default=64, help="tokens of the decode test (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="worker pairs per cell, alternating order (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="measured runs per worker after its warm-up (default 3)")
    ap.add_argument("--model", action="append", default=None, metavar="[LABEL=]PATH",
                    help="a GGUF file (repeatable); default: SmolLM2 f16/q8_0/q4_0/q4_1 and the synthetic 1.1B q8_0/q4_0")
    ap.add_argument("--peers", default=None,
                    help="llama.cpp peers, comma-separated: bench (native llama-bench), binding "
                         "(llama-cpp-python); default bench if the llama-bench binary exists, else binding")
    ap.add_argument("--llama-bench", default=None, metavar="PATH",
                    help=f"native llama-bench binary (default $LLAMA_BENCH or {DEFAULT_LLAMA_BENCH})")
    ap.add_argument("--peer-python", default=None,
                    help=f"interpreter with llama-cpp-python installed (default {DEFAULT_PEER_PYTHON} if it "
                         "exists, else this one)")
    ap.add_argument("--infer-python", default=sys.executable, help="interpreter with infer installed (default: this one)")
    ap.add_argument("--membw-mb", type=int, default=1024, help="array size of the bandwidth test in MiB (0: skip)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker before it is abandoned")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write every sample as JSON to OUT ('-': stdout)")
    ap.add_argument("--worker", choices=["infer", "llama", "llamabench", "membw"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        fn = {"infer": worker_infer, "llama": worker_llama, "llamabench": worker_llamabench,
              "membw": worker_membw}[a.worker]
        a.model = a.model[-1] if a.model else None
        if a.worker != "membw":
            a.threads = int(a.threads)
        print(json.dumps(fn(a)))
        return 0

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 1

    try:
        threads = [int(x) for x in a.threads.split(",")]
        assert threads and all(t > 0 for t in threads)
    except (ValueError, AssertionError):
        return fail(f"--threads: expected comma-separated positive integers, got {a.threads!r}")
    if a.pp < 0 or a.tg < 0 or (a.pp == 0 and a.tg == 0):
        return fail("--pp and --tg must be non-negative and not both 0")
    if a.rounds < 1 or a.reps < 1:
        return fail("--rounds and --reps must be at least 1")
    a.llama_bench = a.llama_bench or os.environ.get("LLAMA_BENCH") or DEFAULT_LLAMA_BENCH
    if a.peer_python is None:
        a.peer_python = DEFAULT_PEER_PYTHON if os.access(DEFAULT_PEER_PYTHON, os.X_OK) else sys.executable
    if a.peers is None:
        peers = ["bench"] if os.access(a.llama_bench, os.X_OK) else ["binding"]
    else:
        peers = [x.strip() for x in a.peers.split(",") if x.strip()]
        bad = [x for x in peers if x not in PEERS]
        if bad or not peers or len(set(peers)) != len(peers):
            return fail(f"--peers: expected a comma-separated subset of {', '.join(PEERS)}, got {a.peers!r}")
    if "bench" in peers and not os.access(a.llama_bench, os.X_OK):
        return fail(f"{a.llama_bench}: no llama-bench binary (give --llama-bench PATH, or --peers binding)")
    checks = [(a.infer_python, "infer")] + ([(a.peer_python, "llama_cpp")] if "binding" in peers else [])
    for py, what in checks:
        chk = subprocess.run([py, "-c", f"import {what}"], capture_output=True, text=True)
        if chk.returncode != 0:
            return fail(f"{py} cannot import {what} (give --{'peer' if what == 'llama_cpp' else 'infer'}-python)")
    models, skipped = [], []
    for spec in (a.model or [f"{lab}={p}" for lab, p in DEFAULT_MODELS]):
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).stem, spec
        if not Path(path).is_file():
            if a.model:
                return fail(f"{path}: no such file")
            skipped.append(f"{label} ({path} missing)")
            continue
        from infer.bench import model_info
        from infer.errors import InferError
        try:
            models.append((label, path, model_info(path)))
        except InferError as e:
            return fail(str(e))
    if not models:
        return fail("no model files found; " + HOW_TO_MAKE)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if max(threads) > cpus:
        print(f"warning: {max(threads)} threads but this process may use {cpus} CPU(s): "
              f"the threads will share cores", file=sys.stderr)
        # Numba's pool defaults to the CPUs available; let infer run as many threads as llama.cpp
        WORKER_ENV.setdefault("NUMBA_NUM_THREADS", str(max(threads)))

    from infer.bench import cpu_name
    import numpy as np

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    t_start = time.time()
    bw_runs = []
    if a.membw_mb:
        say("read bandwidth ...")
        bw_runs.append(measure_bandwidth(a.infer_python, threads, a.membw_mb))
    cells, errors = [], []
    for label, path, info in models:
        rng = np.random.default_rng(a.seed)
        toks = [int(x) for x in rng.integers(0, info.n_vocab, size=max(a.pp, a.tg))]
        for t in threads:
            kinds = ["infer"] + [KIND[p] for p in peers]
            runs = {k: [] for k in kinds}
            for rnd in range(a.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                for kind in order:
                    say(f"{label}, {t} thread(s), round {rnd + 1}/{a.rounds}: {NAME[kind]}")
                    py = a.peer_python if kind == "llama" else a.infer_python
                    try:
                        runs[kind].append(run_worker(py, kind, path, t, a.pp, a.tg, a.reps, toks, a.timeout,
                                                     a.llama_bench if kind == "llamabench" else None))
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                        say(f"  failed: {e}")
                        errors.append(f"{label}, {t} threads, {NAME[kind]}: {e}")
            cell = {"model": label, "path": path, "threads": t, "file_size": info.file_size,
                    "bytes_per_token": info.bytes_per_token, "n_params": info.n_params}
            for kind, rs in runs.items():
                if not rs:
                    cell[kind] = None
                    continue
                pp = [x for r in rs for x in r["pp"]]
                tg = [x for r in rs for x in r["tg"]]
                ttft = [x for r in rs for x in r["ttft"]]
                loads = [r["load_s"] for r in rs if r["load_s"] is not None]
                cell[kind] = {"pp": _med(pp), "tg": _med(tg), "ttft_ms": 1000 * _med(ttft) if ttft else None,
                              "peak_rss": max(r["peak_rss"] for r in rs), "load_s": _med(loads) if loads else None,
                              "pp_samples": pp, "tg_samples": tg,
                              "decode_gbps": info.bytes_per_token * _med(tg) / 1e9}
                if kind == "infer":
                    cell[kind]["threading_layer"] = rs[0].get("threading_layer")
                else:
                    cell[kind]["version"] = rs[0].get("version")
                if kind == "llamabench":
                    cell[kind]["command"] = rs[0].get("command")
            cells.append(cell)
            say(_row(cell, {}, a, peers))
            if cell["infer"] and cell["infer"]["threading_layer"] == "workqueue" and t > 1:
                say("warning: Numba's threading layer is 'workqueue' (no OpenMP/TBB): infer's multi-thread "
                    "figures suffer")
    if a.membw_mb:
        say("read bandwidth (again) ...")
        bw_runs.append(measure_bandwidth(a.infer_python, threads, a.membw_mb))
    bw = {}
    for r in bw_runs:
        for k, v in r.items():
            bw[k] = max(bw.get(k, 0.0), v)
    report = {"cpu": cpu_name(), "threads": threads, "pp": a.pp, "tg": a.tg, "rounds": a.rounds, "reps": a.reps,
              "peers": peers, "llama_bench": a.llama_bench if "bench" in peers else None,
              "read_bandwidth_gbps": bw, "read_bandwidth_runs": bw_runs, "cells": cells, "skipped": skipped, "errors": errors,
              "seconds": time.time() - t_start, "peer_python": a.peer_python, "infer_python": a.infer_python}
    print(to_markdown(report, a, peers), file=sys.stderr if a.json == "-" else sys.stdout)
    if a.json:
        text = json.dumps(report, indent=2)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    return 0


KIND = {"bench": "llamabench", "binding": "llama"}          # peer -> worker kind / cell key
NAME = {"infer": "infer", "llamabench": "llama-bench", "llama": "llama-cpp-python"}


def _row(c, bw, a, peers) -> str:
    i = c["infer"]
    ls = [c.get(KIND[p]) for p in peers]

    def v(rec, key, fmt="{:.1f}"):
        return fmt.format(rec[key]) if rec else "failed"

    def ratio(l, key):
        return f"{i[key] / l[key]:.2f}" if (i and l and l[key]) else "-"

    def share(rec):
        if not rec:
            return "failed"
        g = rec["decode_gbps"]
        b = bw.get(str(c["threads"]))
        return f"{g:.1f} ({100 * g / b:.0f}%)" if b else f"{g:.1f}"
    cells = [c["model"], str(c["threads"])]
    for key, on in (("pp", a.pp), ("tg", a.tg)):
        if on:
            cells.append(v(i, key))
            for l in ls:
                cells += [v(l, key), ratio(l, key)]
    if a.tg:
        cells += [share(i)] + [share(l) for l in ls]
    rss = "{:.0f}"
    cells += [v(r and {"m": r["peak_rss"] / 2**20}, "m", rss) for r in [i] + ls]
    return "| " + " | ".join(cells) + " |"


def to_markdown(rep, a, peers) -> str:
    bw = rep["read_bandwidth_gbps"]
    names = [NAME[KIND[p]] for p in peers]
    head = ["model", "threads"]
    for key, n in (("pp", a.pp), ("tg", a.tg)):
        if n:
            head.append(f"{key}{n} infer")
            for nm in names:
                head += [nm, "ratio"]
    if a.tg:
        head += ["infer GB/s (% BW)"] + [f"{nm} GB/s (% BW)" for nm in names]
    head += ["RSS MiB infer"] + names
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    out += [_row(c, bw, a, peers) for c in rep["cells"]]
    out.append("")
    if bw:
        out.append("read bandwidth (same run, best of before/after): " + ", ".join(
            f"{k} thread{'s' if k != '1' else ''} {v:.1f} GB/s" for k, v in bw.items() if k != "numpy")
            + (f"; numpy a.sum() {bw['numpy']:.1f} GB/s" if "numpy" in bw else ""))
    if rep["cells"]:
        layer = next((c["infer"]["threading_layer"] for c in rep["cells"] if c["infer"]), "?")
        peer_txt = []
        for p in peers:
            ver = next((c[KIND[p]]["version"] for c in rep["cells"] if c.get(KIND[p])), "?")
            peer_txt.append(f"native llama-bench {ver} (-fa 1, -r {a.reps}, {rep['llama_bench']})" if p == "bench"
                            else f"llama-cpp-python {ver} (flash_attn=True)")
        out.append(f"tokens/s are medians of {a.rounds} rounds x {a.reps} runs; ratio = infer / the peer to its "
                   f"left; {'; '.join(peer_txt)}; infer's Numba threading layer {layer}; CPU: {rep['cpu']}")
    if rep["errors"]:
        out.append("failed: " + "; ".join(rep["errors"]))
    if rep["skipped"]:
        out.append("skipped: " + "; ".join(rep["skipped"]) + f" ({HOW_TO_MAKE})")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
