"""Greedy 64 tokens: llama-cpp-python vs infer on the same GGUF file (issue 4, must-show 3).

Usage: python bench/greedy_vs_llamacpp.py FILE.gguf   (needs llama-cpp-python; prints, per prompt,
whether the 64 tokens are identical or where they first differ and infer's top-2 logit gap there)."""
import sys, json, numpy as np
from llama_cpp import Llama
import infer
P = sys.argv[1]
for prompt in ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n"]:
    ll = Llama(model_path=P, n_ctx=256, n_threads=2, verbose=False)
    toks = ll.tokenize(prompt.encode(), add_bos=False, special=True)
    ref = []
    for t in ll.generate(toks, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        ref.append(t)
        if len(ref) == 64: break
    with infer.LLM(P, n_ctx=256) as llm:
        assert llm.tokenize(prompt, special=True) == toks
        e = llm.engine; lg = e.prefill(toks); ours = []; gaps = []
        for i in range(64):
            t = int(np.argmax(lg)); ours.append(t); srt = np.sort(lg)[-2:]; gaps.append(float(srt[1]-srt[0]))
            if i < 63: lg = e.decode(t)
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    print(repr(prompt[:30]), "identical 64" if same is None else f"first difference at {same}: infer top-2 gap {gaps[same]:.4f}, ours {ours[same]} theirs {ref[same]}")
