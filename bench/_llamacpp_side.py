"""The llama.cpp side of bench/quality.py, run by a Python that has llama-cpp-python (not infer).

    python _llamacpp_side.py quantize SRC.gguf DST.gguf TYPE [--pure]
        llama.cpp's own quantizer (llama_model_quantize): TYPE q8_0 | q4_0 | q4_1 | q4_k_m
    python _llamacpp_side.py imatrix-quantize F16.gguf TEMPLATE.gguf DST.gguf IMATRIX.npz
        llama.cpp's importance-weighted Q4_0/Q4_1 (ggml_quantize_chunk with an imatrix, the call
        llama-quantize makes per tensor) of every Q4_0/Q4_1 tensor of TEMPLATE (a --pure file from
        `quantize`), from the F16 file's weights and infer's importance matrix (E[a^2] per channel)
    python _llamacpp_side.py perplexity MODEL.gguf TEXT N_CTX OUT.json
        llama-perplexity's method computed on llama-cpp-python's logits (logits_all=True)
    python _llamacpp_side.py dequantize SRC.gguf DST.gguf
        a copy whose K-quant tensors are dequantized to F32 (the same weight values), for runtimes
        without K-quant kernels
"""
from __future__ import annotations

import ctypes
import json
import math
import sys
import time

import numpy as np

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize(src, dst, typ, pure=False):
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, FTYPES[typ])
    p.nthread = 1
    p.pure = bool(pure)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


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
    from llama_cpp import llama_cpp as lc
    lib = ctypes.CDLL(str(__import__("pathlib").Path(lc.__file__).parent / "lib" / "libggml-base.so"))
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


def dequantize(src, dst):
    import gguf
    G = gguf.GGMLQuantizationType
    keep = {G.F32, G.F16, G.BF16, G.Q8_0, G.Q4_0, G.Q4_1}
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


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "quantize":
        quantize(a[0], a[1], a[2], pure="--pure" in a[3:])
    elif cmd == "imatrix-quantize":
        imatrix_quantize(*a[:4])
    elif cmd == "perplexity":
        perplexity(a[0], a[1], int(a[2]), a[3])
    elif cmd == "dequantize":
        dequantize(a[0], a[1])
    else:
        raise SystemExit(__doc__)
