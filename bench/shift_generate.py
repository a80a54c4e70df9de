"""Generate far past the context with context_policy="shift" (and "stop" for comparison): memory,
speed and the text at the end.

    python bench/shift_generate.py [MODEL] [--ctx 256] [-n 1024] [--keep 4] [--seed 7]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import infer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from shift_ppl import smollm2  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("-n", type=int, default=1024)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("-p", "--prompt", default="Once upon a time, in a small village at the edge of a great forest,")
    a = ap.parse_args()
    model = a.model or smollm2()
    sp = infer.SamplingParams(temperature=0.7, repeat_penalty=1.1, seed=a.seed)
    with infer.LLM(model, n_ctx=a.ctx, n_threads=1, context_policy="stop") as llm:
        r = llm.generate(a.prompt, max_tokens=a.n, sampling=sp)
        print(f"stop : finish_reason={r.finish_reason}, {len(r.tokens)} tokens generated, "
              f"context {llm.n_tokens}/{a.ctx}")
    with infer.LLM(model, n_ctx=a.ctx, n_threads=1, context_policy="shift", n_keep=a.keep) as llm:
        # the end-of-text token does not end this run (llama.cpp's --ignore-eos): a whole -n tokens
        from infer.generate import Stats, generate_tokens
        from infer.sampling import Sampler
        kv = llm.engine.kv
        stats = Stats()
        toks, marks, n_eot = [], {}, 0
        tracemalloc.start()
        t0 = time.perf_counter()
        for i, (tok, reason) in enumerate(generate_tokens(llm.engine, llm.tokenize(a.prompt), Sampler(sp),
                                                          a.n, frozenset(), stats)):
            toks.append(tok)
            n_eot += tok in llm.tokenizer.eot_ids
            if i + 1 in (a.ctx, 2 * a.ctx, a.n) or reason:
                marks[i + 1] = (rss_mib(), tracemalloc.get_traced_memory()[0] / 1024, kv.offset, kv.pos)
        tracemalloc.stop()
        secs = time.perf_counter() - t0
        print(f"shift: finish_reason={reason}, {stats.generated_tokens} tokens generated in "
              f"{secs:.1f} s ({stats.decode_tps:.1f} tok/s; {n_eot} end-of-text tokens passed over), "
              f"KV cache {kv.nbytes / 2**20:.1f} MiB ({kv.offset} slots), {kv.pos} positions seen")
        for n, (rss, traced, off, pos) in sorted(marks.items()):
            print(f"  after {n:5d} tokens: RSS {rss:.1f} MiB, Python heap (tracemalloc) {traced:.0f} KiB, "
                  f"cache slots {off}, position {pos}")
        parts = [llm.detokenize(toks, skip_special=True)]
        text = "".join(parts)
        print("--- the last 600 characters ---\n" + text[-600:])


if __name__ == "__main__":
    main()
