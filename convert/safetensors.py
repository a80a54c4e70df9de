"""Safetensors checkpoints read by hand: validated headers, one tensor (or a band of rows) at a time.

File layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to the end of the header.
Everything is checked before a byte of data is used: the header fits in the file and is at most
100 MB, is a JSON object, every entry has a known dtype, a shape of non-negative integers and data
offsets inside the data area whose length is shape x dtype size. Data is read with pread into fresh
buffers (no mmap, so resident memory stays at the band being converted). bf16 is widened to float32
by shifting its bits (numpy has no bfloat16).

Sharded checkpoints: model.safetensors.index.json {"weight_map": {tensor: shard file}}; every shard
must be a plain file name inside the folder, exist, and hold the tensors the index says it holds.
Pickle checkpoints (.bin, .pt, .pth, .ckpt, zip archives holding data.pkl) are refused unread.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infer.errors import ConvertError

MAX_HEADER = 100 * 1024 * 1024

# every dtype of the safetensors format -> item size in bytes
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8, "C64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16")   # the ones we convert

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HELP = ("pickle checkpoints can run arbitrary code when loaded, so infer never unpickles them; "
               "convert it to safetensors first, in an environment you trust, e.g. "
               "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`, "
               "or download the model's .safetensors files")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    offset: int          # absolute offset of the data in `path`
    nbytes: int
    path: Path

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _looks_pickled(path: Path) -> str | None:
    """Why `path` looks like a pickle/zip checkpoint, or None. Reads 4 bytes; never unpickles."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[8:9] == b"{":                 # u64 length then '{': a safetensors header, whatever the length
        return None
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return "a zip archive holding data.pkl (a PyTorch pickle checkpoint)"
        except (zipfile.BadZipFile, OSError):
            pass
        return "a zip archive, not safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return None


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate the header of one .safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ConvertError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        why = _looks_pickled(path)
        if why:
            raise ConvertError(f"{path}: is {why}, not safetensors; {PICKLE_HELP}")
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ConvertError(f"{path}: safetensors header of {n} bytes is over the 100 MB limit")
        if 8 + n > size:
            raise ConvertError(f"{path}: safetensors header of {n} bytes is larger than the file ({size} bytes)")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise ConvertError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ConvertError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ConvertError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ConvertError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise ConvertError(f"{path}: tensor {name!r}: data offsets [{begin}, {end}] out of range "
                               f"(the data area holds {data_size} bytes)")
        n_el = 1
        for d in shape:
            n_el *= d
        want = n_el * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise ConvertError(f"{path}: tensor {name!r}: data offsets span {end - begin} bytes but shape "
                               f"{shape} x {dtype} needs {want}")
        out[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, end - begin, path)
    return out


class Checkpoint:
    """All tensors of a checkpoint folder, by name, in llama.cpp's order (shards sorted, names sorted)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorEntry] = {}
        self.files: list[Path] = []
        self._fds: dict[Path, int] = {}
        self._open()

    def _open(self) -> None:
        d = self.folder
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        if index.is_file():
            shards = self._read_index(index)
        elif single.is_file():
            shards = {single.name: None}
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if found:
                shards = {n: None for n in found}
            else:
                pickles = sorted(p.name for p in d.iterdir()
                                 if p.is_file() and (p.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(p)))
                if pickles:
                    raise ConvertError(f"{d}: only pickle checkpoints found ({', '.join(pickles[:3])}); {PICKLE_HELP}")
                raise ConvertError(f"{d}: no model.safetensors, model.safetensors.index.json or *.safetensors file")
        for shard in sorted(shards):
            path = d / shard
            entries = read_header(path)
            expected = shards[shard]
            if expected is not None:
                missing = sorted(expected - entries.keys())
                if missing:
                    raise ConvertError(f"{path}: the index names tensor {missing[0]!r} in this shard but it is not there"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            for name in sorted(entries):
                if name in self.tensors:
                    raise ConvertError(f"{path}: tensor {name!r} also in {self.tensors[name].path.name}")
                if expected is not None and name not in expected:
                    continue            # the index is authoritative: a stray copy in another shard is ignored
                self.tensors[name] = entries[name]
            self.files.append(path)

    def _read_index(self, index: Path) -> dict[str, set]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{index}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConvertError(f"{index}: cannot read ({e.strerror})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{index}: no \"weight_map\" object")
        shards: dict[str, set] = {}
        root = self.folder.resolve()
        for name, shard in wm.items():
            if not isinstance(shard, str) or not shard:
                raise ConvertError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name")
            p = Path(shard)
            inside = (not p.is_absolute() and ".." not in p.parts
                      and (self.folder / p).resolve().parent == root)
            if not inside:
                raise ConvertError(f"{index}: shard {shard!r} is a path outside the model folder")
            if not (self.folder / p).is_file():
                raise ConvertError(f"{index}: names shard {shard!r}, which is missing from {self.folder}")
            shards.setdefault(p.name, set()).add(name)
        return shards

    # -- reading ------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_raw(self, e: TensorEntry, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of tensor e (flat, C order) in its own dtype (bf16 as uint16)."""
        isz = DTYPE_SIZES[e.dtype]
        want = count * isz
        buf = os.pread(self._fd(e.path), want, e.offset + start * isz)
        if len(buf) != want:
            raise ConvertError(f"{e.path}: tensor {e.name!r}: file ended early (truncated while converting?)")
        np_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}.get(e.dtype)
        if np_dtype is None:
            raise ConvertError(f"{e.path}: tensor {e.name!r}: dtype {e.dtype} is not supported "
                               f"(supported: {', '.join(FLOAT_DTYPES)})")
        return np.frombuffer(buf, dtype=np_dtype)

    def read_f32(self, e: TensorEntry, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start + count) of tensor e as a new float32 array (flat)."""
        if count is None:
            count = e.n_elements - start
        a = self.read_raw(e, start, count)
        if e.dtype == "BF16":
            return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return a.astype(np.float32)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
