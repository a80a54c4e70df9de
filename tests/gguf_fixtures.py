"""Tiny random llama GGUF files (SmolLM2's vocabulary, 2 layers) for error and structure tests."""
from __future__ import annotations

import gguf
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
            try:
                raw = quants.quantize(a, t)
            except (NotImplementedError, quants.QuantError):   # a type gguf-py cannot write: zero blocks
                bs, ts = gguf.GGML_QUANT_SIZES[t]
                raw = np.zeros((a.shape[0], a.shape[1] // bs * ts), np.uint8)
            w.add_tensor(name, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["write_tiny", "GT", "gguf_bytes", "tiny_model", "write_raw", "RawTensor"]


# --- GGUF bytes written by hand (for files no writer would make) -----------------------------------
import struct  # noqa: E402

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}
# ggml tensor type ids
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 8, 30


def gguf_str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype, v) -> bytes:
    """A value's bytes; arrays are (item type, items)."""
    if vtype == STR:
        return gguf_str(v)
    if vtype == ARR:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(gguf_value(itype, x) for x in items)
    return struct.pack(_FMT[vtype], v)


class RawTensor:
    """A tensor info + data: dims in GGUF order (fastest first); offset None: laid out in order."""

    def __init__(self, name, dims, type_id, data: bytes, offset=None):
        self.name, self.dims, self.type_id, self.data, self.offset = name, list(dims), type_id, data, offset


def gguf_bytes(kv, tensors, *, version=3, n_tensors=None, n_kv=None, alignment=32, fields=None) -> bytes:
    """A GGUF file: kv is a list of (key, value type, value) (repeats and odd keys kept as given),
    tensors a list of RawTensor. n_tensors / n_kv override the header's counts. `fields`, a list,
    receives (position, size, label) of every count, length, type, dimension and offset field."""
    out = bytearray()

    def put(b, label=None, size=None):
        if fields is not None and label:
            fields.append((len(out), size or len(b), label))
        out.extend(b)

    put(b"GGUF")
    put(struct.pack("<I", version), "version")
    put(struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors), "n_tensors")
    put(struct.pack("<Q", len(kv) if n_kv is None else n_kv), "n_kv")
    for key, vtype, v in kv:
        kb = key.encode() if isinstance(key, str) else key
        put(struct.pack("<Q", len(kb)), "key length")
        put(kb)
        put(struct.pack("<I", vtype), "value type")
        if isinstance(v, bytes):            # the value's bytes as given (unknown types, deep nesting)
            put(v)
        elif vtype == ARR:
            itype, items = v
            put(struct.pack("<I", itype), "array type")
            put(struct.pack("<Q", len(items)), "array length")
            if itype == STR:
                for x in items:
                    b = x.encode() if isinstance(x, str) else bytes(x)
                    put(struct.pack("<Q", len(b)), "string length")
                    put(b)
            else:
                put(b"".join(gguf_value(itype, x) for x in items))
        elif vtype == STR:
            b = v.encode() if isinstance(v, str) else bytes(v)
            put(struct.pack("<Q", len(b)), "string length")
            put(b)
        else:
            put(gguf_value(vtype, v), "value")
    offs, off = [], 0
    for t in tensors:
        offs.append(off if t.offset is None else t.offset)
        off = (off + len(t.data) + alignment - 1) // alignment * alignment
    for t, o in zip(tensors, offs):
        nb = t.name.encode() if isinstance(t.name, str) else t.name
        put(struct.pack("<Q", len(nb)), "tensor name length")
        put(nb)
        put(struct.pack("<I", len(t.dims)), "n_dims")
        for d in t.dims:
            put(struct.pack("<Q", d % 2**64), "dim")
        put(struct.pack("<I", t.type_id), "tensor type")
        put(struct.pack("<Q", o % 2**64), "tensor offset")
    out.extend(b"\0" * (-len(out) % alignment))
    base = len(out)
    for t, o in zip(tensors, offs):
        if t.offset is None:
            out.extend(b"\0" * (base + o - len(out)))
            out.extend(t.data)
    if tensors and tensors[-1].offset is None:
        out.extend(b"\0" * (-len(out) % alignment))
    return bytes(out)


def _byte_chars():
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "l l", "o r", "e l", "el l", "H ell"]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab():
    """A byte-level BPE vocabulary of 272 tokens: the 256 byte characters, the products of
    TINY_MERGES, three control tokens (the first is BOS and EOS)."""
    tokens = _byte_chars() + [m.replace(" ", "") for m in TINY_MERGES] + TINY_SPECIALS
    types = [1] * (len(tokens) - len(TINY_SPECIALS)) + [3] * len(TINY_SPECIALS)
    return tokens, types


def _mat(rng, rows, cols, type_id):
    a = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    if type_id == T_F32:
        return a.tobytes()
    if type_id == T_F16:
        return a.astype(np.float16).tobytes()
    return quants.quantize(a, GT(type_id)).tobytes()


# per-layer matrix types of the tiny model: every type the kernels run, in several places
TINY_TYPES = [
    {"attn_q": T_Q4_0, "attn_k": T_Q4_1, "attn_v": T_Q8_0, "attn_output": T_F32,
     "ffn_gate": T_Q4_1, "ffn_up": T_Q4_0, "ffn_down": T_Q8_0},
    {"attn_q": T_F16, "attn_k": T_BF16, "attn_v": T_F32, "attn_output": T_Q4_0,
     "ffn_gate": T_Q8_0, "ffn_up": T_Q4_1, "ffn_down": T_Q4_0},
]


def tiny_model(seed=0):
    """(kv, tensors) of a complete tiny llama model (2 layers, dim 64, a 272-token BPE vocabulary,
    F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) that infer.LLM loads and runs: ~75 KB."""
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocab()
    n = len(tokens)
    hd = DIM // HEADS
    eot = tokens.index("<|endoftext|>")
    kv = [("general.architecture", STR, "llama"), ("general.name", STR, "tiny"),
          ("general.alignment", U32, 32),
          ("llama.context_length", U32, 64), ("llama.embedding_length", U32, DIM),
          ("llama.block_count", U32, LAYERS), ("llama.feed_forward_length", U32, FF),
          ("llama.attention.head_count", U32, HEADS), ("llama.attention.head_count_kv", U32, KV),
          ("llama.rope.freq_base", F32, 10000.0), ("llama.rope.dimension_count", U32, hd),
          ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5), ("llama.vocab_size", U32, n),
          ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "gpt-2"),
          ("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
          ("tokenizer.ggml.merges", ARR, (STR, TINY_MERGES)),
          ("tokenizer.ggml.bos_token_id", U32, eot), ("tokenizer.ggml.eos_token_id", U32, eot),
          ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.chat_template", STR, "{{ messages }}")]

    def vec(k, type_id=T_F32):
        a = (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
        return RawTensor(k, [DIM], type_id, a.astype(np.float16).tobytes() if type_id == T_F16 else a.tobytes())

    shapes = {"attn_q": (HEADS * hd, DIM), "attn_k": (KV * hd, DIM), "attn_v": (KV * hd, DIM),
              "attn_output": (DIM, HEADS * hd), "ffn_gate": (FF, DIM), "ffn_up": (FF, DIM), "ffn_down": (DIM, FF)}
    ts = [RawTensor("token_embd.weight", [DIM, n], T_Q8_0, _mat(rng, n, DIM, T_Q8_0)), vec("output_norm.weight")]
    for i in range(LAYERS):
        ts += [vec(f"blk.{i}.attn_norm.weight"), vec(f"blk.{i}.ffn_norm.weight", T_F16)]
        for m, (r, c) in shapes.items():
            t = TINY_TYPES[i % len(TINY_TYPES)][m]
            ts.append(RawTensor(f"blk.{i}.{m}.weight", [c, r], t, _mat(rng, r, c, t)))
    ts.append(RawTensor("output.weight", [DIM, n], T_F16, _mat(rng, n, DIM, T_F16)))
    return kv, ts


def write_raw(path, kv, tensors, **kw):
    path.write_bytes(gguf_bytes(kv, tensors, **kw))
    return path
