"""A streaming GGUF writer: the header (metadata + tensor infos) first, then tensor data in pieces.

gguf-py's GGUFWriter keeps every tensor until the end (or asks for whole tensors); here the data of
one tensor arrives in bands of rows and goes straight to the file, so memory stays at one band.

Metadata is recorded with `MetaRecorder`, a gguf.GGUFWriter used only for its typed `add_*`
helpers (the very calls llama.cpp's converter makes, so key types match); a key added twice keeps
its first position and its last value, as in gguf-py. Its values are serialized here.

File layout (GGUF v3, little endian): "GGUF", u32 version, u64 n_tensors, u64 n_kv, KV records
(string key, u32 type, value), tensor infos (string name, u32 n_dims, u64 dims fastest first,
u32 ggml type, u64 offset from the data start), zero padding to the alignment (32), tensor data
each padded to the alignment.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGUFValueType as VT

from infer.errors import ConvertError

ALIGNMENT = 32
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
       VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8",
       VT.FLOAT64: "<f8"}


class MetaRecorder(gguf.GGUFWriter):
    """gguf.GGUFWriter as a typed key/value recorder (never opens a file)."""

    def __init__(self, arch: str):
        super().__init__(path=None, arch=arch)

    def add_key_value(self, key, val, vtype, sub_type=None):
        self.kv_data[0][key] = gguf.gguf_writer.GGUFValue(value=val, type=vtype, sub_type=sub_type)

    def items(self) -> list[tuple[str, object]]:
        return list(self.kv_data[0].items())

    def get(self, key, default=None):
        v = self.kv_data[0].get(key)
        return default if v is None else v.value


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _array(val, sub_type) -> bytes:
    if len(val) == 0:
        raise ConvertError("internal error: empty metadata array")
    if sub_type is None:
        sub_type = VT.UINT8 if isinstance(val, bytes) else VT.get_type(val[0])
    head = struct.pack("<IQ", int(sub_type), len(val))
    if sub_type == VT.STRING:
        return head + b"".join(_string(s) for s in val)
    if sub_type in _NP:
        return head + np.asarray(val, dtype=_NP[sub_type]).tobytes()
    raise ConvertError(f"internal error: metadata arrays of {sub_type!r} are not supported")


def pack_value(val, vtype, sub_type=None) -> bytes:
    vtype = VT(vtype)
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], val)
    if vtype == VT.STRING:
        return _string(val)
    if vtype == VT.ARRAY:
        return _array(val, sub_type)
    raise ConvertError(f"internal error: metadata type {vtype!r}")


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple       # numpy order (slowest first)
    ggml_type: int
    nbytes: int


def header_bytes(kv_items, tensors: list[TensorSlot]) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv_items))]
    for key, v in kv_items:
        out.append(_string(key))
        out.append(struct.pack("<I", int(v.type)))
        out.append(pack_value(v.value, v.type, v.sub_type))
    offset = 0
    for t in tensors:
        out.append(_string(t.name))
        out.append(struct.pack("<I", len(t.shape)))
        out.append(struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape)))
        out.append(struct.pack("<IQ", t.ggml_type, offset))
        offset += pad(t.nbytes)
    blob = b"".join(out)
    return blob + b"\0" * (pad(len(blob)) - len(blob))


def file_size(header_len: int, tensors: list[TensorSlot]) -> int:
    return header_len + sum(pad(t.nbytes) for t in tensors)


class StreamWriter:
    """Writes the header, then each tensor's bytes in order (`write` any number of times per tensor)."""

    def __init__(self, f, kv_items, tensors: list[TensorSlot]):
        self.f = f
        self.tensors = tensors
        self.i = -1
        self.written = 0
        f.write(header_bytes(kv_items, tensors))

    def begin(self, name: str) -> None:
        self._close_tensor()
        self.i += 1
        if self.i >= len(self.tensors) or self.tensors[self.i].name != name:
            raise ConvertError(f"internal error: tensor {name!r} written out of order")
        self.written = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.written += mv.nbytes
        if self.written > self.tensors[self.i].nbytes:
            raise ConvertError(f"internal error: tensor {self.tensors[self.i].name!r} got more bytes than planned")
        self.f.write(mv)

    def _close_tensor(self) -> None:
        if self.i >= 0:
            t = self.tensors[self.i]
            if self.written != t.nbytes:
                raise ConvertError(f"internal error: tensor {t.name!r}: wrote {self.written} of {t.nbytes} bytes")
            self.f.write(b"\0" * (pad(t.nbytes) - t.nbytes))

    def finish(self) -> None:
        self._close_tensor()
        self.i += 1
        if self.i != len(self.tensors):
            raise ConvertError(f"internal error: {len(self.tensors) - self.i} tensors not written")
