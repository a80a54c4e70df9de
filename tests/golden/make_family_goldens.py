#!/usr/bin/env python3
"""Goldens for every model family infer runs (issue 15, "Must show 1"): tiny random-weight Hugging
Face checkpoints run by transformers in float32, and the same checkpoints converted by llama.cpp's
convert_hf_to_gguf.py. tests/test_families.py reads the outputs and needs neither torch nor llama.cpp.

HOW TO RUN
    # reference venv, apart from the project's .venv (torch 2.13.0 is a local CPU wheel here; never
    # install plain `torch`; transformers pinned to the goldens' version)
    python3 -m venv /work/goldenv
    /work/goldenv/bin/pip install torch==2.13.0 transformers==5.24.0 numpy safetensors sentencepiece tokenizers protobuf
    /work/goldenv/bin/pip install /work/llamacpp/src/gguf-py        # llama.cpp's own gguf-py
    # regenerate (about a minute: one transformers forward and one llama.cpp conversion per family)
    /work/goldenv/bin/python tests/golden/make_family_goldens.py [--llamacpp /work/llamacpp/src]
    # or only some families, the others' goldens kept as they are
    /work/goldenv/bin/python tests/golden/make_family_goldens.py --only phi3 smollm3

VERSIONS used for the committed goldens (also in family_goldens.json): Python 3.11.7, torch
2.13.0+cpu, transformers 5.24.0, numpy 2.4.6, sentencepiece 0.2.3, tokenizers 0.23.3, gguf-py 0.19.0
(llama.cpp's own), llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f (2026-10-01; /work/llamacpp/src
is llama-cpp-python's vendor/llama.cpp, whose commit is the one its checkout records: llamacpp_commit).
phi3 and smollm3 were added later (--only phi3 smollm3) with the same versions. The fixtures'
tokenizers are trained by sentencepiece / tokenizers: other versions may train other vocabularies,
which the tests see as a weights hash mismatch (then regenerate).

WHAT IT COMPUTES, per family of tests/convert_fixtures.py's FAMILY_MAKERS
(llama_spm, llama_bpe, qwen2, qwen3, mistral, llama3_rope, llama_linear, llama_yarn, gemma3,
gemma3_rope_params, phi3, smollm3), each against its float64 reference (convert_fixtures.family_reference):
  1. The HF folder, built by the fixture maker in a temporary directory (fixed seeds, weights exact
     in float16, tiny SentencePiece / BPE tokenizers trained there). Recorded: sha256 of the weights
     (convert_fixtures.weights_sha256: names, shapes, float32 values) and of config.json, so a test
     that rebuilds the folder knows it has the same checkpoint.
  2. The prompt: cf.TEXT tokenized by the fixture's own tokenizer library (sentencepiece with BOS in
     front; tokenizers' Tokenizer with its post-processor), its first N_PROMPT (40) ids. 40 > 2 x the
     Gemma 3 sliding window (8), so windowed layers drop keys over most of the prompt.
  3. transformers: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
     attn_implementation="eager"), one forward over the prompt, no cache, torch.set_num_threads(1):
     logits at every position [N_PROMPT, n_vocab] float32. Cross-check recorded in the meta:
     max |transformers - float64 reference| (convert_fixtures.reference_logits /
     reference_logits_gemma3 / reference_logits_phi3, numpy, written from transformers' semantics) and whether the argmax
     agrees everywhere; the script stops if the difference exceeds 1e-3 (then one of the two is
     not the model the other thinks it is).
  4. llama.cpp: convert_hf_to_gguf.py FOLDER --outtype f16 --outfile tests/data/families/NAME.gguf,
     in a subprocess of this interpreter. One patch, for the BPE fixtures only: llama.cpp names the
     pre-tokenizer by a hash of the tokenization of a test string, and a tokenizer trained here is in
     no table, so TextModel.get_vocab_base_pre is replaced by one returning the name the fixture's
     regex was copied from ("llama-bpe": Llama 3's, also smollm3's; "qwen2": Qwen2's). Nothing else
     is changed. The file's sha256 goes in the meta.
  4b. LONG_PROMPT families (phi3): a 300-token prompt (cf.TEXT repeated), past Phi-3's
     original_max_position_embeddings (256), so transformers runs LongRoPE's long factors: its logits
     at the last 40 positions, checked against the float64 reference like step 3.

  5. llama.cpp's --outtype q8_0 conversion of the folder: its gguf_digest (metadata, tensor hashes).
  6. The same folder with config.json and generation_config.json replaced by the ones transformers
     writes for the loaded model (model.config / model.generation_config .save_pretrained: rope_parameters
     instead of rope_theta / rope_scaling, explicit head_dim, layer_types, pad_token_id, dtype, ...),
     converted by llama.cpp the same way; its gguf_digest (metadata, tensor hashes) goes in the meta,
     so infer convert can be checked on transformers-written configs without another file.

OUTPUTS
  tests/data/families/NAME.gguf   llama.cpp's conversion (f16 matrices, f32 norms)
  tests/golden/family_goldens.npz np.savez_compressed, plain arrays (np.load(allow_pickle=False)):
      NAME.ids       [N_PROMPT] int32    the prompt
      NAME.logits    [N_PROMPT, n_vocab] float32   transformers' logits
      NAME.long_ids  [LONG_PROMPT[NAME]] int32, NAME.long_logits [N_LONG_KEPT, n_vocab] float32 (phi3)
  tests/golden/family_goldens.json versions (python, torch, transformers, numpy, sentencepiece,
      tokenizers, gguf-py, llama.cpp commit), and per family: fixture hashes, GGUF sha256, the
      cross-check figures, the smallest top-1/top-2 logit margin over the prompt, and
      feature_effect: how far the float64 reference moves without the family's rope_scaling (phi3:
      LongRoPE's short factors and attention factor), (Gemma 3) sliding window or (SmolLM3) NoPE
      layers, i.e. what a runtime ignoring it would miss the goldens by (>= 0.1, checked, so the
      tests' 1e-2 sees it); long_prompt (phi3): step 4b's figures and how far the short factors
      instead of the long ones move the reference; transformers_config: the two JSON files of step 6.
  tests/golden/family_goldens_digests.json  per family, convert_fixtures.gguf_digest of llama.cpp's
      q8_0 conversion (step 5) and of its f16 conversion of the step-6 folder ("transformers_config").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))
import convert_fixtures as cf  # noqa: E402

N_PROMPT = 40
# families whose feature needs a longer prompt: phi3's LongRoPE long factors, which transformers runs
# for a forward longer than original_max_position_embeddings (256): a prompt of LONG_PROMPT[name]
# tokens, transformers' logits kept at its last N_LONG_KEPT positions
LONG_PROMPT = {"phi3": 300}
N_LONG_KEPT = 40
PRE = {"llama_bpe": "llama-bpe", "llama3_rope": "llama-bpe", "llama_linear": "llama-bpe", "llama_yarn": "llama-bpe",
       "qwen2": "qwen2", "qwen3": "qwen2", "smollm3": "llama-bpe"}

RUNNER = r"""
import sys, runpy
src, folder, out, pre, outtype = sys.argv[1:6]
sys.path.insert(0, src)
if pre:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", outtype, "--outfile", out]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tokenize_text(d: Path, text: str = cf.TEXT) -> list[int]:
    if (d / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(text)


def transformers_logits(d: Path, ids: list[int], saved: Path | None = None) -> np.ndarray:
    """The logits; and into `saved`, config.json and generation_config.json as transformers writes them."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    if saved is not None:
        model.config.save_pretrained(saved)
        model.generation_config.save_pretrained(saved)
    return out.logits[0].float().numpy()


def long_prompt(d: Path, name: str) -> tuple[list[int], np.ndarray, dict]:
    """LONG_PROMPT: the ids (cf.TEXT repeated, tokenized, cut), transformers' logits at the last
    N_LONG_KEPT positions, and the meta: the check against the float64 reference (stops past 1e-3)
    and how far the reference moves with the short factors instead of the long ones."""
    n = LONG_PROMPT[name]
    ids = tokenize_text(d, cf.TEXT * 8)[:n]
    assert len(ids) == n, (name, len(ids))
    got = transformers_logits(d, ids)[-N_LONG_KEPT:]
    ref = cf.family_reference(name)(d, ids)[-N_LONG_KEPT:]
    err = float(np.abs(got - ref).max())
    same_top = bool((got.argmax(1) == ref.argmax(1)).all())
    if err > 1e-3 or not same_top:
        sys.exit(f"{name}, {n} tokens: transformers and the float64 reference differ by {err:.3g} "
                 f"(same argmax: {same_top})")
    alt = d.parent / f"{d.name}-short-factors"
    shutil.copytree(d, alt)
    cfg = json.loads((alt / "config.json").read_text())
    cfg["rope_scaling"]["long_factor"] = cfg["rope_scaling"]["short_factor"]
    (alt / "config.json").write_text(json.dumps(cfg))
    dist = float(np.abs(cf.family_reference(name)(alt, ids)[-N_LONG_KEPT:] - ref).max())
    if dist < 0.1:
        sys.exit(f"{name}: the long factors move the long prompt's logits by only {dist:.3g}")
    top2 = np.sort(got, 1)[:, -2:]
    return ids, got, {"n_prompt": n, "positions_kept": [n - N_LONG_KEPT, n],
                      "max_abs_transformers_vs_float64_reference": err,
                      "argmax_equal_to_float64_reference": same_top,
                      "min_top1_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
                      "short_instead_of_long_factors_max_abs_logit_change": dist}


def feature_effect(d: Path, name: str, ids: list[int], ref: np.ndarray) -> dict | None:
    """How far the float64 reference moves without the family's feature (rope_scaling; Gemma 3's
    sliding window): a runtime ignoring it would miss the goldens by that much. Stops below 0.1."""
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("rope_scaling"):
        what, cfg["rope_scaling"] = "rope_scaling removed", None
    elif name == "gemma3_rope_params":
        what = "sliding layers' RoPE base 20000 -> 10000 (the default)"
        cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 10000.0
    elif name == "gemma3":
        what, cfg["sliding_window"] = "sliding_window 8 -> 4096", 4096
    elif cfg.get("no_rope_layers"):
        what = f"no_rope_layers {cfg['no_rope_layers']} -> all 1 (RoPE in every layer)"
        cfg["no_rope_layers"] = [1] * len(cfg["no_rope_layers"])
    else:
        return None
    alt = d.parent / f"{d.name}-without"
    shutil.copytree(d, alt)
    (alt / "config.json").write_text(json.dumps(cfg))
    dist = float(np.abs(cf.family_reference(name)(alt, ids) - ref).max())
    if dist < 0.1:
        sys.exit(f"{name}: {what} moves the logits by only {dist:.3g}; the test would not see it")
    return {"change": what, "max_abs_logit_change": dist}


def llamacpp_convert(src: Path, d: Path, out: Path, pre: str, outtype: str = "f16") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", RUNNER, str(src), str(d), str(out), pre, outtype],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama.cpp's converter failed on {d.name}:\n{r.stderr[-3000:]}")


def llamacpp_commit(src: Path) -> str:
    """llama.cpp's commit: HEAD of src's checkout, or, where src is a submodule folder of another
    checkout without its own .git (llama-cpp-python's vendor/llama.cpp), the commit that checkout
    records for it (not the outer repository's HEAD)."""
    def git(where, *a):
        return subprocess.run(["git", "-C", str(where), *a], capture_output=True, text=True).stdout.strip()
    top = git(src, "rev-parse", "--show-toplevel")
    if not top:
        return "unknown"
    if Path(top).resolve() == src.resolve():
        return git(src, "rev-parse", "HEAD") or "unknown"
    entry = git(top, "ls-tree", "HEAD", str(src.resolve().relative_to(Path(top).resolve()))).split()
    return entry[2] if len(entry) >= 3 and entry[1] == "commit" else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp/src"))
    ap.add_argument("--only", nargs="*", help="families to redo (the others are kept from the existing goldens)")
    args = ap.parse_args()
    import sentencepiece
    import tokenizers
    import torch
    import transformers
    import gguf
    commit = llamacpp_commit(args.llamacpp)
    npz_path, json_path = HERE / "family_goldens.npz", HERE / "family_goldens.json"
    digests_path = HERE / "family_goldens_digests.json"
    arrays, fams, digests = {}, {}, {}
    if args.only and npz_path.exists():
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        fams = json.loads(json_path.read_text())["families"]
        digests = json.loads(digests_path.read_text())
    names = args.only or list(cf.FAMILY_MAKERS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = cf.FAMILY_MAKERS[name](Path(tmp) / f"tiny-{name}")
            text_ids = tokenize_text(d)
            ids = text_ids[:N_PROMPT]
            assert len(ids) == N_PROMPT, (name, len(text_ids))
            saved = Path(tmp) / "saved"
            got = transformers_logits(d, ids, saved)
            ref = cf.family_reference(name)(d, ids)
            err = float(np.abs(got - ref).max())
            same_top = bool((got.argmax(1) == ref.argmax(1)).all())
            if err > 1e-3 or not same_top:
                sys.exit(f"{name}: transformers and the float64 reference differ by {err:.3g} "
                         f"(same argmax: {same_top})")
            effect = feature_effect(d, name, ids, ref)
            long_meta = None
            if name in LONG_PROMPT:
                long_ids, long_logits, long_meta = long_prompt(d, name)
                arrays[f"{name}.long_ids"] = np.asarray(long_ids, np.int32)
                arrays[f"{name}.long_logits"] = long_logits.astype(np.float32)
            top2 = np.sort(got, 1)[:, -2:]
            gguf_path = TESTS / "data" / "families" / f"{name}.gguf"
            llamacpp_convert(args.llamacpp, d, gguf_path, PRE.get(name, ""))
            # the same folder with transformers' own config.json / generation_config.json
            alt = Path(tmp) / "with-transformers-config" / f"tiny-{name}"
            shutil.copytree(d, alt)
            tf_files = {}
            for fn in ("config.json", "generation_config.json"):
                shutil.copy(saved / fn, alt / fn)
                tf_files[fn] = json.loads((saved / fn).read_text())
            alt_gguf = Path(tmp) / f"{name}-transformers-config.gguf"
            llamacpp_convert(args.llamacpp, alt, alt_gguf, PRE.get(name, ""))
            alt_digest = cf.gguf_digest(alt_gguf)
            q8_gguf = Path(tmp) / f"{name}-q8_0.gguf"
            llamacpp_convert(args.llamacpp, d, q8_gguf, PRE.get(name, ""), "q8_0")
            q8_digest = cf.gguf_digest(q8_gguf)
            shutil.rmtree(saved)
            digests[name] = {"q8_0": q8_digest, "transformers_config": alt_digest}
            cfg = json.loads((d / "config.json").read_text())
            arrays[f"{name}.ids"] = np.asarray(ids, np.int32)
            arrays[f"{name}.logits"] = got.astype(np.float32)
            fams[name] = {
                "hf_architecture": cfg["architectures"][0], "model_type": cfg["model_type"],
                "n_vocab": cfg["vocab_size"], "n_prompt": N_PROMPT,
                "rope_scaling": cfg.get("rope_scaling"), "sliding_window": cfg.get("sliding_window"),
                "weights_sha256": cf.weights_sha256(d), "config_sha256": sha256_file(d / "config.json"),
                "gguf": f"tests/data/families/{name}.gguf", "gguf_sha256": sha256_file(gguf_path),
                "gguf_bytes": gguf_path.stat().st_size, "llamacpp_pre_tokenizer_patched_to": PRE.get(name),
                "max_abs_transformers_vs_float64_reference": err, "argmax_equal_to_float64_reference": same_top,
                "min_top1_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
                "logit_abs_max": float(np.abs(got).max()),
                "feature_effect": effect,
                "long_prompt": long_meta,
                "transformers_config": {
                    "files": tf_files,
                    "llamacpp_file_same_as_fixture_file": alt_gguf.read_bytes() == gguf_path.read_bytes()},
            }
            print(f"{name:13s} vocab {cfg['vocab_size']:4d}  tf vs f64 {err:.2e}  margin "
                  f"{fams[name]['min_top1_top2_margin']:.3f}  gguf {gguf_path.stat().st_size} B")
    np.savez_compressed(npz_path, **arrays)
    meta = {"script": "tests/golden/make_family_goldens.py",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__,
                         "sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__,
                         "gguf_py": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                         "llamacpp_commit": commit},
            "transformers_settings": {"dtype": "float32", "attn_implementation": "eager", "threads": 1,
                                      "use_cache": False},
            "llamacpp_command": "convert_hf_to_gguf.py FOLDER --outtype f16 --outfile NAME.gguf",
            "families": {k: fams[k] for k in cf.FAMILY_MAKERS if k in fams}}
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"{json.dumps(k)}: {json.dumps(digests[k], separators=(',', ':'))}" for k in cf.FAMILY_MAKERS if k in digests]
    digests_path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
