"""`infer convert` beside llama.cpp's converter + quantizer on a real checkpoint, in one run.

    python bench/convert_bench.py HF_DIR [--llamacpp DIR] [--ref-python PY] [--work DIR]

HF_DIR      a Llama/Qwen2 safetensors folder (e.g. SmolLM2-135M made by shared/fixtures/make_smollm2_hf.py)
--llamacpp  llama.cpp's source tree (vendor/llama.cpp of the llama-cpp-python sdist), for
            convert_hf_to_gguf.py and its gguf-py; its Python deps (torch, transformers, sentencepiece)
            must be in --ref-python. Without it only our side is measured.
Prints (markdown):
  1. time and peak RSS (/usr/bin/time -v) of our conversions (q8_0, q4_0, bf16) and of llama.cpp's
     converter (bf16, q8_0) + llama_model_quantize (q8_0, q4_0) from its bf16 file;
  2. byte identity of every tensor of the same type (ours vs llama.cpp's), per type;
  3. metadata keys / tensor names that differ, with values;
  4. peak memory of our q8_0 conversion against 1.3 x the largest tensor + 200 MB;
  5. llama-cpp-python loading our files and its greedy 64 tokens on our file vs on llama.cpp's
     file (and vs infer's greedy tokens on our file when infer.LLM exists).
  6. with --fixtures: the test fixtures (tests/convert_fixtures.py) and variants (Mistral alias, llama3 /
     linear / yarn rope scaling) converted by both sides, f16 and q8_0, compared whole-file. llama.cpp
     refuses BPE vocabularies whose hash it does not know, so for those its pre-tokenizer name is
     given (llama-bpe / qwen2: what ours detects from the pre-tokenizer's structure).
Nothing here is asserted in tests; it is run by hand.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"
OUR_CONVERT = "import sys; from infer.convert import convert; print(convert(sys.argv[1], sys.argv[2], sys.argv[3], force=True))"


def timed(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Run cmd under /usr/bin/time -v: (wall seconds, peak RSS bytes, output)."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return wall, rss, r.stdout


def quantize_llamacpp(src: Path, dst: Path, ftype_name: str) -> float:
    code = ("import sys, ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}; "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
    wall, rss, _ = timed([sys.executable, "-c", code, str(src), str(dst)])
    return wall


def read(path: Path):
    import gguf
    r = gguf.GGUFReader(path)
    kv = {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in r.tensors}
    return kv, tensors


def compare(ours: Path, theirs: Path) -> dict:
    ko, to = read(ours)
    kt, tt = read(theirs)
    same_type = [n for n in tt if n in to and to[n][0] == tt[n][0]]
    identical = [n for n in same_type if np.array_equal(to[n][1], tt[n][1])]
    by_type: dict[str, list[int]] = {}
    for n in same_type:
        s = by_type.setdefault(to[n][0], [0, 0])
        s[0] += 1
        s[1] += n in identical
    return {
        "by_type": by_type,
        "differing": [n for n in same_type if n not in identical],
        "other_type": [(n, to[n][0], tt[n][0]) for n in tt if n in to and to[n][0] != tt[n][0]],
        "names_only_ours": sorted(set(to) - set(tt)), "names_only_theirs": sorted(set(tt) - set(to)),
        "keys_only_ours": sorted(set(ko) - set(kt)), "keys_only_theirs": sorted(set(kt) - set(ko)),
        "key_value_diffs": [(k, str(ko[k][1])[:60], str(kt[k][1])[:60]) for k in kt if k in ko and ko[k] != kt[k]],
        "key_order_equal": [k for k in ko] == [k for k in kt] and list(to) == list(tt),
        "files_identical": ours.read_bytes() == theirs.read_bytes(),
    }


def largest_tensor_bytes(hf: Path) -> tuple[str, int]:
    best = ("", 0)
    for f in hf.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = json.loads(fh.read(n))
        for k, v in h.items():
            if k != "__metadata__":
                size = v["data_offsets"][1] - v["data_offsets"][0]
                best = max(best, (k, size), key=lambda t: t[1])
    return best


def greedy_llamacpp(path: Path, n: int = 64) -> list[int]:
    code = f"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, seed=0)
toks = llm.tokenize({PROMPT!r}.encode(), add_bos=True, special=True)
out = []
for t in llm.generate(toks, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    out.append(t)
    if t == llm.token_eos() or len(out) == {n}:
        break
print(json.dumps([toks, out]))
"""
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        return [f"llama-cpp-python failed: {r.stderr.strip().splitlines()[-1:]}"]
    return json.loads(r.stdout.strip().splitlines()[-1])


def greedy_infer(path: Path, prompt_ids: list[int], n: int = 64) -> list[int] | str:
    import infer
    if not hasattr(infer, "LLM"):
        return "infer.LLM not available yet"
    llm = infer.LLM(str(path), n_ctx=256)
    ids = list(prompt_ids)
    out: list[int] = []
    eos = None
    try:
        from infer.gguf_file import GGUFFile
        with GGUFFile(path) as g:
            eos = g.metadata.get("tokenizer.ggml.eos_token_id")
    except Exception:
        pass
    for _ in range(n):
        t = int(np.argmax(llm.logits(ids)[-1]))
        out.append(t)
        ids.append(t)
        if t == eos:
            break
    return out


FORCE_PRE_DRIVER = r"""
import os, sys, runpy
root = os.environ["LLAMACPP_DIR"]
sys.path.insert(0, root)
sys.argv = [os.path.join(root, "convert_hf_to_gguf.py")] + sys.argv[1:]
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def patched(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:          # a test vocabulary: use the name given
        return os.environ["FORCE_PRE"]
base.TextModel.get_vocab_base_pre = patched
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fixtures_section(llamacpp: Path, ref_python: str, work: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import convert_fixtures as cf
    from infer.convert import convert
    root = work / "fixtures"
    variants = {
        "llama_spm": ("llama_spm", None), "llama_bpe": ("llama_bpe", None), "qwen2": ("qwen2", None),
        "mistral": ("llama_spm", lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral")),
        "llama3_rope": ("llama_bpe", lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 32.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "linear_rope": ("llama_spm", lambda c: c.update(rope_scaling={"type": "linear", "factor": 4.0})),
        "qwen2_yarn": ("qwen2", lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 64})),
    }
    print("## Test fixtures: whole files, ours vs llama.cpp's converter\n")
    print("| fixture | type | tokenizer.ggml.pre | identical |\n|---|---|---|---|")
    for name, (base, edit) in variants.items():
        d = root / name
        if not d.exists():
            cf.MAKERS[base](d)
            if edit:
                cfg = json.loads((d / "config.json").read_text())
                edit(cfg)
                (d / "config.json").write_text(json.dumps(cfg))
        for t in ("f16", "q8_0"):
            ours, theirs = root / f"{name}-{t}.ours.gguf", root / f"{name}-{t}.llamacpp.gguf"
            s = convert(d, ours, t, force=True)
            import gguf
            pre = gguf.GGUFReader(ours).fields["tokenizer.ggml.pre"].contents()
            env = dict(os.environ, LLAMACPP_DIR=str(llamacpp), FORCE_PRE=pre)
            r = subprocess.run([ref_python, "-c", FORCE_PRE_DRIVER, str(d), "--outtype", t, "--outfile", str(theirs)],
                               capture_output=True, text=True, env=env)
            same = r.returncode == 0 and ours.read_bytes() == theirs.read_bytes()
            print(f"| {name} | {t} | {pre} | {same if r.returncode == 0 else 'llama.cpp failed'} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--llamacpp", type=Path, default=None)
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/work/refvenv/bin/python"))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--fixtures", action="store_true", help="also compare the test fixtures (needs --llamacpp)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    hf = a.hf_dir
    print(f"# infer convert vs llama.cpp on {hf}\n")

    if a.fixtures and a.llamacpp:
        fixtures_section(a.llamacpp, a.ref_python, work)

    # warm the Numba cache once so the timings below are of conversions, not of compilation
    subprocess.run([sys.executable, "-c", OUR_CONVERT, str(hf), str(work / "warm.gguf"), "q4_1"], check=True,
                   capture_output=True)
    ours = {}
    rows = []
    for t in ("q8_0", "q4_0", "bf16"):
        out = work / f"ours-{t}.gguf"
        wall, rss, _ = timed([sys.executable, "-c", OUR_CONVERT, str(hf), str(out), t])
        ours[t] = out
        rows.append((f"infer convert --type {t}", wall, rss, out.stat().st_size))

    theirs = {}
    if a.llamacpp:
        conv = str(a.llamacpp / "convert_hf_to_gguf.py")
        for t in ("bf16", "q8_0"):
            out = work / f"llamacpp-{t}.gguf"
            wall, rss, _ = timed([a.ref_python, conv, str(hf), "--outtype", t, "--outfile", str(out)])
            theirs[f"conv-{t}"] = out
            rows.append((f"convert_hf_to_gguf.py --outtype {t}", wall, rss, out.stat().st_size))
        conv_bf16 = next(r for r in rows if r[0].endswith("bf16") and r[0].startswith("convert"))[1]
        for t in ("q8_0", "q4_0"):
            out = work / f"llamacpp-bf16-quant-{t}.gguf"
            q = quantize_llamacpp(theirs["conv-bf16"], out, t)
            theirs[f"quant-{t}"] = out
            rows.append((f"  + llama_model_quantize {t} (total {conv_bf16 + q:.1f} s)", q, 0, out.stat().st_size))

    print("## Time and peak memory\n")
    print("| run | wall s | peak RSS MB | file MB |\n|---|---:|---:|---:|")
    for name, wall, rss, size in rows:
        print(f"| {name} | {wall:.2f} | {rss / 1e6:.0f} | {size / 1e6:.1f} |" if rss else
              f"| {name} | {wall:.2f} | (quantize call) | {size / 1e6:.1f} |")

    big_name, big = largest_tensor_bytes(hf)
    peak = next(r[2] for r in rows if r[0] == "infer convert --type q8_0")
    limit = 1.3 * big + 200e6
    print(f"\nPeak memory of our q8_0 conversion: {peak / 1e6:.0f} MB; largest tensor {big_name} "
          f"{big / 1e6:.1f} MB -> limit 1.3 x {big / 1e6:.1f} + 200 = {limit / 1e6:.0f} MB: "
          f"{'PASS' if peak < limit else 'FAIL'}\n")

    if theirs:
        print("## Byte identity (tensors of the same type)\n")
        pairs = [("q8_0", ours["q8_0"], theirs["conv-q8_0"], "convert_hf_to_gguf --outtype q8_0"),
                 ("q8_0", ours["q8_0"], theirs["quant-q8_0"], "bf16 + llama_model_quantize q8_0"),
                 ("q4_0", ours["q4_0"], theirs["quant-q4_0"], "bf16 + llama_model_quantize q4_0"),
                 ("bf16", ours["bf16"], theirs["conv-bf16"], "convert_hf_to_gguf --outtype bf16")]
        for t, o, th, what in pairs:
            c = compare(o, th)
            per = ", ".join(f"{k}: {v[1]}/{v[0]} identical" for k, v in sorted(c["by_type"].items()))
            print(f"- ours {t} vs {what}: {per}; differing {c['differing'][:5]}; "
                  f"other types {c['other_type']}; whole file identical: {c['files_identical']}")
            print(f"  - tensor names only ours {c['names_only_ours']}, only theirs {c['names_only_theirs']}; "
                  f"metadata keys only ours {c['keys_only_ours']}, only theirs {c['keys_only_theirs']}; "
                  f"value differences {c['key_value_diffs']}; same order: {c['key_order_equal']}")
        print()

    print("## Running the files\n")
    runs = {name: greedy_llamacpp(p) for name, p in (("ours q8_0", ours["q8_0"]), ("ours q4_0", ours["q4_0"]))}
    if theirs:
        runs["llama.cpp q8_0"] = greedy_llamacpp(theirs["conv-q8_0"])
        runs["llama.cpp q4_0"] = greedy_llamacpp(theirs["quant-q4_0"])
    for name, r in runs.items():
        print(f"- llama-cpp-python greedy on {name}: {len(r[1]) if isinstance(r[1], list) else r} tokens: {r[1]}")
    if theirs:
        for t in ("q8_0", "q4_0"):
            note = (" (the files differ in token_embd's type: our q4_0 is pure, llama-quantize keeps it higher)"
                    if t == "q4_0" else "")
            print(f"- greedy tokens ours {t} == llama.cpp {t}: {runs[f'ours {t}'][1] == runs[f'llama.cpp {t}'][1]}{note}")
    prompt_ids = runs["ours q8_0"][0]
    for t in ("q8_0", "q4_0"):
        mine = greedy_infer(ours[t], prompt_ids)
        if isinstance(mine, str):
            print(f"- infer greedy on ours {t}: {mine}")
        else:
            print(f"- infer greedy on ours {t} == llama-cpp-python greedy on the same file: "
                  f"{mine == runs[f'ours {t}'][1]} ({mine})")


if __name__ == "__main__":
    main()
