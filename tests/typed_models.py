"""The real SmolLM2-135M-Instruct in every type the runtime runs natively: its Q4_1 file's weights
dequantized (gguf's reference) and quantized again by infer's own quantizer (bit-equal to gguf's,
tests/test_quant_codecs.py), written with gguf-py's GGUFWriter, metadata copied as it is. A real
model's logits have a real top token (a tiny random model's are near ties everywhere), so these
files let the route tests compare int8 and float paths type by type.

    requantize(src, dst, type_of)   type_of(name, shape) -> "Q8_0" | "Q4_0" | "Q4_1" | "F16" | "BF16" | "F32"
    MIXED(name, shape)              a type per layer, all six in turn (token_embd Q8_0)
"""
from __future__ import annotations

import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants

LAYER_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32")


def MIXED(name: str, shape) -> str:
    if name.startswith("blk."):
        return LAYER_TYPES[int(name.split(".")[1]) % len(LAYER_TYPES)]
    return "Q8_0"


def requantize(src, dst, type_of) -> None:
    from infer.quant import types
    from infer.quant.quantize import quantize_rows
    r = gguf.GGUFReader(src)
    tmp = f"{dst}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(k, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        x = quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        name = "F32" if x.ndim == 1 else type_of(t.name, shape)
        if name == "F32":
            w.add_tensor(t.name, x)
        else:
            qt = getattr(types, name)
            w.add_tensor(t.name, quantize_rows(x, qt).reshape(shape[0], -1), raw_dtype=GT[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
