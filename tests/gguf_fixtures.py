"""Tiny random llama GGUF files (SmolLM2's vocabulary, 2 layers) for error and structure tests."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFWriter, quants

from infer.gguf_file import GGUFFile

DIM, HEADS, KV, FF, LAYERS = 64, 4, 2, 128, 2
_VOCAB: dict = {}


def vocab_metadata(smollm2_path) -> dict:
    if not _VOCAB:
        with GGUFFile(smollm2_path) as gf:
            _VOCAB.update({k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")})
    return _VOCAB


def tensors(n_vocab: int, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    hd = DIM // HEADS
    t = {"token_embd.weight": (n_vocab, DIM), "output_norm.weight": (DIM,)}
    for i in range(LAYERS):
        t.update({f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
                  f"blk.{i}.attn_q.weight": (HEADS * hd, DIM), f"blk.{i}.attn_k.weight": (KV * hd, DIM),
                  f"blk.{i}.attn_v.weight": (KV * hd, DIM), f"blk.{i}.attn_output.weight": (DIM, HEADS * hd),
                  f"blk.{i}.ffn_gate.weight": (FF, DIM), f"blk.{i}.ffn_up.weight": (FF, DIM),
                  f"blk.{i}.ffn_down.weight": (DIM, FF)})
    return {k: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)
                ).astype(np.float32) for k, s in t.items()}


def write_tiny(path, smollm2_path, *, arch="llama", drop=(), reshape=None, types=None,
               md_override=None, md_drop=()):
    """Write a tiny model; drop/reshape/types/md_* make it broken in one chosen way."""
    voc = vocab_metadata(smollm2_path)
    n_vocab = len(voc["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), arch)
    md = {f"{arch}.context_length": 256, f"{arch}.embedding_length": DIM, f"{arch}.block_count": LAYERS,
          f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": HEADS,
          f"{arch}.attention.head_count_kv": KV, f"{arch}.rope.freq_base": 10000.0,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-5}
    md.update(md_override or {})
    for k, v in md.items():
        if k in md_drop:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    w.add_tokenizer_model(voc["tokenizer.ggml.model"])
    w.add_tokenizer_pre(voc["tokenizer.ggml.pre"])
    w.add_token_list(voc["tokenizer.ggml.tokens"])
    w.add_token_types(voc["tokenizer.ggml.token_type"].tolist())
    w.add_token_merges(voc["tokenizer.ggml.merges"])
    w.add_bos_token_id(int(voc["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(voc["tokenizer.ggml.eos_token_id"]))
    w.add_add_bos_token(False)
    for name, a in tensors(n_vocab).items():
        if name in drop:
            continue
        if reshape and name in reshape:
            a = np.zeros(reshape[name], np.float32)
        t = (types or {}).get(name)
        if t is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, quants.quantize(a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["write_tiny", "GT"]
