"""Open a GGUF file by memory map: metadata as Python values, tensors as zero-copy numpy views.

A small reader of our own (gguf's GGUFReader builds a numpy object per field and takes seconds on
a 49k-token vocabulary; start-up time matters). Everything read is checked: magic, version,
truncation, tensor types, tensor extents against the file size. Layout of the file (v2/v3):
magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv (key, type, value) records,
then n_tensors (name, n_dims, dims[n_dims] (fastest first), type, offset) records, then the
tensor data at the next multiple of `general.alignment` (default 32).
"""
from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GGUFError, TensorError, UnsupportedError
from infer.quant.types import QType, qtype_by_id

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> (struct format, numpy dtype)
_SCALAR = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
T_STRING, T_ARRAY = 8, 9
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
              7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple          # numpy order (slowest first): (rows, cols) for a matrix
    qtype: QType
    offset: int           # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class StringArray(Sequence):
    """A GGUF array of strings (a vocabulary, BPE merges), kept as the file's bytes and decoded
    item by item on access: a 49k-token vocabulary as Python strings costs ~4 MiB, as bytes
    ~0.7 MiB, and the merges are read once, to build the tokenizer. Indexing, slicing (a list),
    iteration, len and == (with any sequence of strings) behave like a list's; list(a) copies."""
    __slots__ = ("_raw", "_offs")

    def __init__(self, raw: bytes, offsets):
        self._raw, self._offs = raw, offsets      # offsets: n + 1 item starts (length prefix) in raw

    def __len__(self):
        return len(self._offs) - 1

    def _item(self, i):
        a, b = self._offs[i] + 8, self._offs[i + 1]
        return str(self._raw[a:b], "utf-8", "replace")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        i = i.__index__()
        if not -n <= i < n:
            raise IndexError("StringArray index out of range")
        return self._item(i + n if i < 0 else i)

    def __iter__(self):
        raw, offs = self._raw, self._offs
        for i in range(len(offs) - 1):
            yield str(raw[offs[i] + 8:offs[i + 1]], "utf-8", "replace")

    def __eq__(self, other):
        if isinstance(other, StringArray):
            return self._raw == other._raw
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        n = len(self)
        return f"StringArray({self[:3]!r}{' ...' if n > 3 else ''}, {n} strings)"


_U64 = struct.Struct("<Q")


class _Cursor:
    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf, size, path):
        self.buf, self.pos, self.size, self.path = buf, 0, size, path

    def need(self, n, what):
        if self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated file (needed {n} bytes for {what} at offset {self.pos}, "
                            f"file has {self.size})")

    def unpack(self, fmt, n, what):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what):
        n = self.unpack("<Q", 8, what)
        if n > self.size:
            raise GGUFError(f"{self.path}: corrupt string length {n} in {what} at offset {self.pos - 8}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def strings(self, n, what):
        """n strings in a row (vocabularies, merges) as a StringArray: every length checked against
        the file here, the text decoded when read."""
        buf, size = self.buf, self.size
        start = pos = self.pos
        u64 = _U64.unpack_from
        offs = array("q")
        append = offs.append
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (ln,) = u64(buf, pos)
            append(pos - start)
            pos += 8 + ln
            if pos > size:
                self.pos = pos - ln
                if ln > size:
                    raise GGUFError(f"{self.path}: corrupt string length {ln} in {what} at offset {pos - ln - 8}")
                self.need(ln, what)
        append(pos - start)
        self.pos = pos
        return StringArray(bytes(buf[start:pos]), offs)

    def value(self, vtype, what):
        if vtype in _SCALAR:
            fmt, dt = _SCALAR[vtype]
            return self.unpack(fmt, np.dtype(dt).itemsize, what)
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            itype = self.unpack("<I", 4, what)
            n = self.unpack("<Q", 8, what)
            if itype in _SCALAR:
                dt = np.dtype(_SCALAR[itype][1]).newbyteorder("<")
                self.need(n * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr
            if itype == T_STRING:
                if n > self.size // 8:
                    raise GGUFError(f"{self.path}: corrupt array length {n} in {what}")
                return self.strings(n, what)
            if itype == T_ARRAY:
                return [self.value(T_ARRAY, what) for _ in range(n)]
            raise GGUFError(f"{self.path}: unknown array item type {itype} in {what}")
        raise GGUFError(f"{self.path}: unknown value type {vtype} in {what}")


class GGUFFile:
    """A GGUF file opened by memory map. `metadata` maps keys to Python values (numeric arrays as
    numpy arrays, string arrays as StringArray sequences); `tensors` maps names to TensorInfo;
    `view(name)` gives a zero-copy numpy view of a tensor's raw data."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                with open(fd, "rb", closefd=False) as f:
                    head = f.read(4)
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{self.path}: not a GGUF file (bad magic {head!r})")
                raise GGUFError(f"{self.path}: truncated file ({size} bytes)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        self.data = np.frombuffer(self._mmap, dtype=np.uint8)  # the whole file, read-only
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self):
        c = _Cursor(self._mmap, self.size, self.path)
        if bytes(self._mmap[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {bytes(self._mmap[:4])!r})")
        c.pos = 4
        self.version = c.unpack("<I", 4, "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} (2 and 3 are supported)")
        n_tensors = c.unpack("<Q", 8, "tensor count")
        n_kv = c.unpack("<Q", 8, "metadata count")
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise GGUFError(f"{self.path}: corrupt header (tensor count {n_tensors}, metadata count {n_kv})")
        self.metadata: dict = {}
        self.metadata_types: dict = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.unpack("<I", 4, f"type of {key}")
            self.metadata_types[key] = vtype
            self.metadata[key] = c.value(vtype, key)
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            nd = c.unpack("<I", 4, f"dims of tensor {name}")
            if nd > 4:
                raise GGUFError(f"{self.path}: tensor {name} has {nd} dimensions (at most 4)")
            dims = [c.unpack("<Q", 8, f"dims of tensor {name}") for _ in range(nd)]
            tid = c.unpack("<I", 4, f"type of tensor {name}")
            off = c.unpack("<Q", 8, f"offset of tensor {name}")
            infos.append((name, dims, tid, off))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a power of two, got {align!r}")
        self.alignment = align
        self.data_offset = (c.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, tid, off in infos:
            qt = qtype_by_id(tid)
            if qt is None:
                raise UnsupportedError(f"{self.path}: tensor {name} has unsupported type id {tid}")
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % qt.block_size:
                raise TensorError(f"{self.path}: tensor {name} row length {dims[0]} is not a multiple "
                                  f"of the {qt.name} block size {qt.block_size}")
            nbytes = n // qt.block_size * qt.type_size
            start = self.data_offset + off
            if start + nbytes > self.size:
                raise GGUFError(f"{self.path}: truncated file (tensor {name} needs bytes {start}..{start + nbytes}, "
                                f"file has {self.size})")
            if name in self.tensors:
                raise TensorError(f"{self.path}: duplicate tensor {name}")
            self.tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qt, start, nbytes)

    # --- access -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a (rows, row_bytes) uint8 view (1-D tensors: one row)."""
        t = self.tensors[name]
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return self.data[t.offset:t.offset + t.nbytes].reshape(rows, -1)

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view in the tensor's own dtype where numpy has one (F32 float32, F16 as
        uint16 bits, BF16 as uint16 bits), else the raw (rows, row_bytes) uint8 blocks."""
        t = self.tensors[name]
        dt = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16}.get(t.qtype.name)
        if dt is None:
            return self.raw(name)
        return self.data[t.offset:t.offset + t.nbytes].view(dt).reshape(t.shape)

    def close(self):
        self.data = None
        m, self._mmap = getattr(self, "_mmap", None), None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # views still alive; the map is released when they go

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
