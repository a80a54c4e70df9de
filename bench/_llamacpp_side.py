"""The llama.cpp side of bench/quality.py and bench/kl_vs_llamacpp.py, run by a Python that has
llama-cpp-python (not infer), e.g. /work/peer/python (the sdist's Python sources on the native build's
libllama.so: a wrapper setting PYTHONPATH and LLAMA_CPP_LIB_PATH).

    python _llamacpp_side.py quantize SRC.gguf DST.gguf TYPE [--pure] [--allow-requantize] [--threads N]
        llama.cpp's own quantizer (llama_model_quantize): TYPE one of FTYPES below (q8_0, q4_0, q4_1,
        q5_0, q5_1, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, iq4_nl, iq4_xs, f16, bf16, ...).
        --pure: every quantizable tensor in the one type (llama-quantize --pure; the types of tensors
        whose rows do not fit the type's block still fall back); --allow-requantize: the source may be
        quantized already (its tensors are dequantized first; llama-quantize --allow-requantize)
    python _llamacpp_side.py logits MODEL.gguf IDS.npy OUT.npy [--threads N] [--batch N]
        llama.cpp's logits (logits_all=True) of every position of the token ids in IDS.npy (int32,
        run as one sequence from position 0, no BOS added): OUT.npy (n, n_vocab) float32
    python _llamacpp_side.py tokenize MODEL.gguf TEXT OUT.npy
        llama.cpp's tokens of a text file (read as llama-perplexity's -f: one trailing newline
        dropped; add_special as the vocabulary says, special=False): int32 ids
    python _llamacpp_side.py native-perplexity MODEL.gguf TEXT [-c 512] [-t 2] [--bin PATH] [--json OUT]
        native llama-perplexity (`llama-perplexity -m MODEL -f TEXT -c 512 -t 2`; default binary
        $LLAMA_PERPLEXITY or /work/llamacpp/bin/llama-perplexity); parses its "Final estimate:
        PPL = x +/- y" (needs no llama-cpp-python: any Python runs it). Compare with infer's
        `infer perplexity MODEL -f TEXT -c 512 -t 2` (same method: chunks of -c tokens, BOS first
        when the vocabulary adds one, the second half of each chunk scored; issue 14 wants the two
        PPLs within 1%), e.g. on /usr/share/common-licenses/GPL-3
    python _llamacpp_side.py imatrix-quantize F16.gguf TEMPLATE.gguf DST.gguf IMATRIX.npz
        llama.cpp's importance-weighted Q4_0/Q4_1 (ggml_quantize_chunk with an imatrix, the call
        llama-quantize makes per tensor) of every Q4_0/Q4_1 tensor of TEMPLATE (a --pure file from
        `quantize`), from the F16 file's weights and infer's importance matrix (E[a^2] per channel)
    python _llamacpp_side.py perplexity MODEL.gguf TEXT N_CTX OUT.json
        llama-perplexity's method computed on llama-cpp-python's logits (logits_all=True)
    python _llamacpp_side.py dequantize SRC.gguf DST.gguf [--all]
        a copy whose K-quant tensors are dequantized to F32 (the same weight values), for runtimes
        without K-quant kernels; --all: every quantized tensor (Q8_0, Q4_0, ... too), e.g. for a
        llama.cpp reference without its int8 activations (F32 weights take its float matmul)
"""
from __future__ import annotations

import ctypes
import json
import math
import sys
import time

import numpy as np

FTYPES = {t: "LLAMA_FTYPE_MOSTLY_" + t.upper() for t in (
    "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l",
    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "iq3_s", "iq3_m", "iq3_xs",
    "iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "tq1_0", "tq2_0")}


def quantize(src, dst, typ, pure=False, allow_requantize=False, nthread=1):
    import llama_cpp
    if typ not in FTYPES or not hasattr(llama_cpp, FTYPES[typ]):
        raise SystemExit(f"quantize: unknown type {typ!r} (one of {', '.join(FTYPES)})")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, FTYPES[typ])
    p.nthread = int(nthread)
    p.pure = bool(pure)
    p.allow_requantize = bool(allow_requantize)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def _lib_dir():
    """Where the native libraries are: $LLAMA_CPP_LIB_PATH (as llama_cpp itself honours), else the
    package's lib/ (a pip-installed llama-cpp-python)."""
    import os
    from pathlib import Path
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    from llama_cpp import llama_cpp as lc
    return Path(lc.__file__).parent / "lib"


def _copy_gguf(template, dst, replace):
    """Write `template`'s metadata and tensors to dst, with replace[name] = (raw bytes array, ggml type)."""
    import gguf
    r = gguf.GGUFReader(template)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    for t in r.tensors:
        data, qt = replace.get(t.name, (np.asarray(t.data), t.tensor_type))
        shape = [int(d) for d in reversed(t.shape)]                # numpy order
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.asarray(data).reshape(shape), raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.asarray(data, np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1),
                         raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def imatrix_quantize(f16, template, dst, imatrix_path):
    import gguf
    lib = ctypes.CDLL(str(_lib_dir() / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    z = np.load(imatrix_path, allow_pickle=False)
    names, counts, lengths, sums = [str(n) for n in z["names"]], z["counts"], z["lengths"], z["sums"]
    offs = np.concatenate([[0], np.cumsum(lengths)])
    imp = {n: (sums[offs[i]:offs[i + 1]] / max(1, counts[i])).astype(np.float32) for i, n in enumerate(names)}
    src = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    replace = {}
    G = gguf.GGMLQuantizationType
    for t in gguf.GGUFReader(template).tensors:
        if t.tensor_type not in (G.Q4_0, G.Q4_1) or t.name not in imp:
            continue
        s = src[t.name]
        x = np.ascontiguousarray(gguf.quants.dequantize(np.asarray(s.data), s.tensor_type), np.float32)
        rows, cols = x.shape
        out = np.zeros(np.asarray(t.data).nbytes, np.uint8)
        w = np.ascontiguousarray(imp[t.name])
        n = fn(int(t.tensor_type), x.ctypes.data, out.ctypes.data, 0, rows, cols, w.ctypes.data)
        assert n == out.nbytes, (t.name, n, out.nbytes)
        replace[t.name] = (out.reshape(rows, -1), t.tensor_type)
    _copy_gguf(template, dst, replace)
    print(f"{dst}: {len(replace)} tensors quantized with the importance matrix")


def dequantize(src, dst, all_types=False):
    import gguf
    G = gguf.GGMLQuantizationType
    keep = {G.F32, G.F16, G.BF16} if all_types else {G.F32, G.F16, G.BF16, G.Q8_0, G.Q4_0, G.Q4_1}
    replace = {}
    for t in gguf.GGUFReader(src).tensors:
        if t.tensor_type not in keep:
            replace[t.name] = (gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32), G.F32)
    _copy_gguf(src, dst, replace)
    print(f"{dst}: {len(replace)} tensors dequantized to F32")


def perplexity(model, text_path, n_ctx, out):
    from llama_cpp import Llama
    data = open(text_path, "rb").read()
    if data.endswith(b"\n"):                    # llama-perplexity's -f drops one trailing newline
        data = data[:-1]
    ll = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=1,
               verbose=False)
    toks = ll.tokenize(data, add_bos=True, special=False)        # add_special: BOS only if the vocab adds one
    add_bos = ll._model.add_bos_token() if hasattr(ll._model, "add_bos_token") else False
    n_chunks = len(toks) // n_ctx
    first = n_ctx // 2
    nll = []
    t0 = time.perf_counter()
    for c in range(n_chunks):
        chunk = list(toks[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            chunk[0] = ll.token_bos()
        ll.reset()
        ll.eval(chunk)
        logits = np.asarray(ll.scores[:n_ctx], np.float64)
        for i in range(first, n_ctx - 1):
            row = logits[i]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll.append(lse - row[chunk[i + 1]])
    nll = np.array(nll)
    res = {"ppl": float(math.exp(nll.mean())), "n_chunks": n_chunks, "n_tokens": len(toks),
           "scored": len(nll), "tokens": [int(t) for t in toks], "seconds": time.perf_counter() - t0}
    with open(out, "w") as f:
        json.dump(res, f)
    print(f"{model}: PPL {res['ppl']:.4f} over {n_chunks} chunks")


def logits(model, ids_path, out, n_threads=2, n_batch=512):
    from llama_cpp import Llama
    ids = [int(t) for t in np.load(ids_path)]
    n = len(ids)
    n_batch = max(1, min(int(n_batch), n))
    ll = Llama(model_path=model, n_ctx=n, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
               n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    t0 = time.perf_counter()
    ll.eval(ids)
    x = np.array(ll.scores[:n], np.float32)
    np.save(out, x)
    print(json.dumps({"n": n, "n_vocab": int(x.shape[1]), "seconds": time.perf_counter() - t0,
                      "bos": int(ll.token_bos())}))


def tokenize(model, text_path, out):
    from llama_cpp import Llama
    data = open(text_path, "rb").read()
    if data.endswith(b"\n"):
        data = data[:-1]
    ll = Llama(model_path=model, n_ctx=16, vocab_only=True, verbose=False)
    np.save(out, np.array(ll.tokenize(data, add_bos=True, special=False), np.int32))


def native_perplexity(model, text, n_ctx=512, threads=2, binary=None, extra=()):
    """Run native llama-perplexity; returns {"ppl", "ppl_stderr", "chunks", ...} from its output."""
    import os
    import re
    import subprocess
    binary = binary or os.environ.get("LLAMA_PERPLEXITY") or "/work/llamacpp/bin/llama-perplexity"
    cmd = [binary, "-m", model, "-f", text, "-c", str(n_ctx), "-t", str(threads), *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + "\n" + p.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if p.returncode != 0 or not m:
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise SystemExit(f"llama-perplexity failed (exit {p.returncode}): {tail}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)),
            "n_chunks": int(chunks.group(1)) if chunks else None, "n_ctx": n_ctx, "threads": threads,
            "model": model, "text": text, "command": cmd, "seconds": time.perf_counter() - t0}


def _opt(args, name, default, conv=str):
    if name in args:
        return conv(args[args.index(name) + 1])
    return default


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "quantize":
        quantize(a[0], a[1], a[2], pure="--pure" in a[3:], allow_requantize="--allow-requantize" in a[3:],
                 nthread=_opt(a, "--threads", 1, int))
    elif cmd == "imatrix-quantize":
        imatrix_quantize(*a[:4])
    elif cmd == "perplexity":
        perplexity(a[0], a[1], int(a[2]), a[3])
    elif cmd == "dequantize":
        dequantize(a[0], a[1], all_types="--all" in a[2:])
    elif cmd == "logits":
        logits(a[0], a[1], a[2], n_threads=_opt(a, "--threads", 2, int), n_batch=_opt(a, "--batch", 512, int))
    elif cmd == "tokenize":
        tokenize(a[0], a[1], a[2])
    elif cmd == "native-perplexity":
        r = native_perplexity(a[0], a[1], n_ctx=_opt(a, "-c", 512, int), threads=_opt(a, "-t", 2, int),
                              binary=_opt(a, "--bin", None))
        print(f"{a[0]}: llama-perplexity PPL {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f} "
              f"({r['n_chunks']} chunks of {r['n_ctx']}, {r['threads']} threads)")
        if "--json" in a:
            with open(_opt(a, "--json", None), "w") as f:
                json.dump(r, f, indent=2)
    else:
        raise SystemExit(__doc__)
