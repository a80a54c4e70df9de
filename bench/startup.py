"""Start-up time and peak memory of `infer generate`, measured from outside the process (issue 3,
must-show 4 and 5).

    python bench/startup.py [MODEL] [--runs 5] [--cold-runs 1] [--no-cold] [--no-rss] [-t N] [--json]

1. Time to first token: wall time from launching `infer generate MODEL -p <16-token prompt> -n 1
   --temp 0` to the first byte it prints on stdout (the first generated token), median of --runs
   runs with a warm JIT cache (one untimed run first warms it), then --cold-runs runs with a cold
   one (NUMBA_CACHE_DIR pointed at a new empty folder: every kernel compiles). The OS file cache is
   warm in both (the model file and Python's modules were read before). `--verbose`'s own figures
   (load, TTFT inside the process) are shown alongside.
2. Peak RSS while generating at n_ctx 2048 (default SmolLM2 q8_0): `infer generate -c 2048` on a
   prompt of ~1500 tokens (3 prefill chunks, most of the KV cache written) plus 128 generated
   tokens; the child's peak RSS (wait4's ru_maxrss) against file size + KV cache bytes + 150 MB.
MODEL defaults to /work/models/bench/ours-q8_0.gguf. `infer` is the console script next to this
interpreter (or --infer CMD).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "/work/models/bench/ours-q8_0.gguf"
BASE_TEXT = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn "
             "and the children play in the golden fields beyond the river on a warm summer afternoon. ")
RSS_BUDGET = 150 * 2**20


def infer_cmd(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    exe = Path(sys.executable).with_name("infer")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("infer")
    return [found] if found else [sys.executable, "-m", "infer.cli"]


def prompt_of(llm, n_tokens: int) -> tuple[str, int]:
    """A plain-text prompt that tokenizes to n_tokens tokens (or as close as words allow)."""
    words = (BASE_TEXT * (n_tokens // 10 + 2)).split()
    lo, hi = 1, len(words)
    while lo < hi:                      # the most words whose tokens do not exceed n_tokens
        mid = (lo + hi + 1) // 2
        if len(llm.tokenize(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, len(llm.tokenize(text))


def run_generate(cmd: list[str], env: dict) -> dict:
    """Launch, time the first stdout byte, wait; child's peak RSS from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    out = b""
    fd = p.stdout.fileno()
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        if first is None:
            first = time.perf_counter() - t0
        out += b
    err = p.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[:3])} ... failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    r = {"first_token_s": first, "wall_s": wall, "peak_rss": ru.ru_maxrss * 1024,
         "stdout": out.decode(errors="replace")}
    m = re.search(r"load: ([\d.]+) s", err)
    if m:
        r["load_s"] = float(m.group(1))
    m = re.search(r"TTFT: (\d+) ms", err)
    if m:
        r["ttft_s"] = int(m.group(1)) / 1000
    m = re.search(r"prompt tokens: (\d+)", err)
    if m:
        r["prompt_tokens"] = int(m.group(1))
    m = re.search(r"peak RSS: (\d+) MiB", err)
    if m:
        r["self_peak_rss_mib"] = int(m.group(1))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=5, help="warm-cache runs (median reported)")
    ap.add_argument("--cold-runs", type=int, default=1, help="cold-cache runs")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rss-prompt-tokens", type=int, default=1500)
    ap.add_argument("--rss-gen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048, help="context of the RSS run (default 2048)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads for infer (default: its own)")
    ap.add_argument("--infer", default=None, help="command that runs infer (default: the console script)")
    ap.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    a = ap.parse_args(argv)
    if not Path(a.model).is_file():
        print(f"error: {a.model}: no such file", file=sys.stderr)
        return 1
    if a.runs < 1 or a.cold_runs < 0 or a.prompt_tokens < 1:
        print("error: --runs and --prompt-tokens must be positive, --cold-runs non-negative", file=sys.stderr)
        return 1

    import infer
    with infer.LLM(a.model, n_ctx=a.ctx) as llm:          # tokenizer and KV size only; nothing is run
        text16, n16 = prompt_of(llm, a.prompt_tokens)
        long_text, n_long = prompt_of(llm, min(a.rss_prompt_tokens, a.ctx - a.rss_gen - 1))
        kv_bytes = llm.engine.kv.nbytes
    file_size = os.path.getsize(a.model)
    base = infer_cmd(a.infer) + ["generate", a.model, "--temp", "0", "-v"]
    if a.threads:
        base += ["-t", str(a.threads)]
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # with it, infer's own modules compile from source at every start (~0.07 s): measure
        # Python's default, as a user has it (a pip install writes the bytecode anyway)
        print("(PYTHONDONTWRITEBYTECODE is set here: unset for the runs, as Python's default)", file=sys.stderr)
    rep = {"model": a.model, "file_size": file_size, "prompt_tokens": n16, "command": shlex.join(base)}

    def say(msg):
        if not a.json:
            print(msg, flush=True)

    cmd16 = base + ["-p", text16, "-n", "1", "-c", "512"]
    say(f"{a.model}: {file_size / 1e6:.1f} MB; prompt of {n16} tokens; {shlex.join(infer_cmd(a.infer))}")
    run_generate(cmd16, env)                                  # warms the JIT cache and the file cache
    warm = [run_generate(cmd16, env) for _ in range(a.runs)]
    ft = [r["first_token_s"] for r in warm]
    rep["warm"] = {"first_token_s": statistics.median(ft), "min_s": min(ft), "max_s": max(ft), "runs": warm}
    say(f"warm JIT cache: process start -> first token {statistics.median(ft):.2f} s median "
        f"(min {min(ft):.2f}, max {max(ft):.2f}; {a.runs} runs) | inside: load {_med(warm, 'load_s')} s, "
        f"TTFT {_med(warm, 'ttft_s')} s")
    if not a.no_cold and a.cold_runs:
        cold = []
        for _ in range(a.cold_runs):
            with tempfile.TemporaryDirectory(prefix="numba-cold-") as d:
                cold.append(run_generate(cmd16, {**env, "NUMBA_CACHE_DIR": d}))
        ft = [r["first_token_s"] for r in cold]
        rep["cold"] = {"first_token_s": statistics.median(ft), "runs": cold}
        say(f"cold JIT cache (empty NUMBA_CACHE_DIR): process start -> first token "
            f"{statistics.median(ft):.2f} s ({a.cold_runs} run{'s' if a.cold_runs > 1 else ''}) | inside: load "
            f"{_med(cold, 'load_s')} s, TTFT {_med(cold, 'ttft_s')} s")
    if not a.no_rss:
        r = run_generate(base + ["-p", long_text, "-n", str(a.rss_gen), "-c", str(a.ctx)], env)
        bound = file_size + kv_bytes + RSS_BUDGET
        rep["rss"] = {"ctx": a.ctx, "prompt_tokens": n_long, "generated": a.rss_gen, "peak_rss": r["peak_rss"],
                      "kv_bytes": kv_bytes, "bound": bound, "ok": r["peak_rss"] <= bound,
                      "headroom": bound - r["peak_rss"]}
        say(f"peak RSS at n_ctx {a.ctx} ({n_long} prompt + {a.rss_gen} generated tokens): "
            f"{r['peak_rss'] / 2**20:.0f} MiB; bound file {file_size / 2**20:.0f} + KV {kv_bytes / 2**20:.0f} "
            f"+ 150 = {bound / 2**20:.0f} MiB -> {'OK' if r['peak_rss'] <= bound else 'OVER'} "
            f"({(bound - r['peak_rss']) / 2**20:+.0f} MiB headroom)")
    if a.json:
        for k in ("warm", "cold"):
            for r in rep.get(k, {}).get("runs", []):
                r.pop("stdout", None)
        print(json.dumps(rep, indent=2))
    return 0


def _med(runs, key):
    xs = [r[key] for r in runs if key in r]
    return f"{statistics.median(xs):.2f}" if xs else "?"


if __name__ == "__main__":
    sys.exit(main())
