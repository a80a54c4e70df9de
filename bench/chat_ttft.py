"""Follow-up turns prefill only their new tokens: TTFT of a conversation's turns, with prefix reuse
and (for comparison) with the cache emptied before each turn.

    python bench/chat_ttft.py [MODEL] [--doc-chars 2000] [-n 32]
"""
from __future__ import annotations

import argparse
import sys

import infer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from shift_ppl import smollm2  # noqa: E402

QUESTIONS = ["What is this text about?", "Who publishes it?", "Can I sell copies?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--doc-chars", type=int, default=2000)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=1)
    a = ap.parse_args()
    doc = open("/usr/share/common-licenses/GPL-3").read()[:a.doc_chars]
    greedy = infer.SamplingParams.greedy()
    print("| turn | cache | prompt tokens | cached | prefilled | TTFT ms | reply tokens |")
    print("|---|---|---|---|---|---|---|")
    with infer.LLM(a.model or smollm2(), n_ctx=2048, n_threads=a.threads) as llm:
        llm.generate("warm up", max_tokens=2)
        for reuse in (True, False):
            msgs = []
            for i, q in enumerate(QUESTIONS):
                msgs.append({"role": "user", "content": (doc + "\n\n" + q) if i == 0 else q})
                if not reuse:
                    llm.engine.reset()
                r = llm.chat(msgs, max_tokens=a.n, sampling=greedy)
                s = r.stats
                print(f"| {i + 1} | {'reused' if reuse else 'emptied'} | {s.prompt_tokens} | {s.cached_tokens} | "
                      f"{s.prefill_tokens} | {s.ttft_s * 1000:.0f} | {s.generated_tokens} |")
                msgs.append({"role": "assistant", "content": r.text})


if __name__ == "__main__":
    main()
