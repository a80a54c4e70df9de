"""Open a GGUF file by memory map: metadata as Python values, tensors as zero-copy numpy views.

A small reader of our own (gguf's GGUFReader builds a numpy object per field and takes seconds on
a 49k-token vocabulary; start-up time matters). Everything read is checked: magic, version,
truncation, tensor types, tensor extents against the file size. Layout of the file (v2/v3):
magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv (key, type, value) records,
then n_tensors (name, n_dims, dims[n_dims] (fastest first), type, offset) records, then the
tensor data at the next multiple of `general.alignment` (default 32).

The container rules of the GGUF specification (ggml docs/gguf.md) and of llama.cpp's loader
(gguf.cpp, gguf_init_from_file_impl) are enforced, each refused with a one-line GGUFError (or its
TensorError / UnsupportedError subclasses) naming the file: version 2 or 3; counts that fit the
file; keys non-empty, at most 65535 bytes (the spec), valid UTF-8 and not repeated; known value
types, arrays nested at most MAX_NESTING deep; `general.alignment` a uint32 power of two; tensor
names at most 63 bytes (llama.cpp's GGML_MAX_NAME of 64 with the NUL), valid UTF-8 and not
repeated; 1..4 dimensions (GGML_MAX_DIMS), each > 0 and < 2^63 (llama.cpp reads them as int64);
an element count below INT64_MAX; a known type whose block size divides the rows; offsets that
are multiples of the alignment, inside the file and not overlapping; and a tensor count that
agrees with the tensor infos in the file. llama.cpp also wants the tensors stored in info order
with nothing between them; that is not required here (the spec does not ask it).
"""
from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GGUFError, InferError, TensorError, UnsupportedError
from infer.quant.types import QType, qtype_by_id

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_KEY = 65535         # bytes in a metadata key (spec: at most 2^16 - 1)
MAX_NAME = 63           # bytes in a tensor name (llama.cpp: GGML_MAX_NAME 64 with the terminating NUL)
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_NESTING = 8         # arrays of arrays (the spec allows them, llama.cpp refuses them) at most this deep
INT64_MAX = 2**63 - 1

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
        return iter(self.tolist())

    def tolist(self, sep: str | None = None) -> list:
        """All items decoded (a list of str) in one pass over the bytes: the 8-byte length before
        each item becomes one NUL and the whole decodes and splits at once (~10x faster than item
        by item for a 49k vocabulary; the same strings, invalid UTF-8 replaced as per item). With
        `sep` (a one-character string), each item is also split at its first `sep` after position
        0 (BPE merges 'left right' -> [left, right, ...]) when every item has exactly one there;
        None if not."""
        raw, offs = self._raw, self._offs
        n = len(offs) - 1
        if n == 0:
            return []
        o = np.frombuffer(offs, np.int64)
        buf = np.frombuffer(raw, np.uint8).copy()
        keep = np.ones(buf.size, bool)
        keep[(o[:-1, None] + np.arange(7)).ravel()] = False
        buf[o[:-1] + 7] = 0
        text = str(buf[keep].tobytes(), "utf-8", "replace")
        nul_ok = text.count("\0") == n
        if sep is not None:
            if not nul_ok or text.count(sep) != n or ("\0" + sep) in text:
                return None
            items = text.replace("\0", sep).split(sep)[1:]
            return items if len(items) == 2 * n else None
        if not nul_ok:                       # an item with a NUL in it: item by item
            return [str(raw[offs[i] + 8:offs[i + 1]], "utf-8", "replace") for i in range(n)]
        return text.split("\0")[1:]

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


def _show(name: str) -> str:
    """A key or tensor name as it goes into a one-line message (control characters escaped)."""
    return name if name.isprintable() and name else repr(name)


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

    def raw_string(self, what) -> bytes:
        n = self.unpack("<Q", 8, what)
        if n > self.size:
            raise GGUFError(f"{self.path}: corrupt string length {n} in {what} at offset {self.pos - 8}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def string(self, what):
        return self.raw_string(what).decode("utf-8", errors="replace")

    def key(self, i):
        """Metadata key #i: non-empty, at most MAX_KEY bytes, valid UTF-8 (the spec asks ASCII)."""
        at = self.pos
        n = self.unpack("<Q", 8, f"metadata key #{i}")
        if n == 0:
            raise GGUFError(f"{self.path}: metadata key #{i} at offset {at} is empty")
        if n > MAX_KEY:
            raise GGUFError(f"{self.path}: metadata key #{i} at offset {at} is {n} bytes long "
                            f"(at most {MAX_KEY})")
        self.pos = at
        raw = self.raw_string(f"metadata key #{i}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: metadata key #{i} at offset {at} is not valid UTF-8 "
                            f"({raw[:40]!r})") from None

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

    def value(self, vtype, what, depth=0):
        if vtype in _SCALAR:
            fmt, dt = _SCALAR[vtype]
            return self.unpack(fmt, np.dtype(dt).itemsize, what)
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            if depth >= MAX_NESTING:
                raise GGUFError(f"{self.path}: arrays nested more than {MAX_NESTING} deep in {_show(what)}")
            itype = self.unpack("<I", 4, what)
            n = self.unpack("<Q", 8, what)
            if itype in _SCALAR:
                dt = np.dtype(_SCALAR[itype][1]).newbyteorder("<")
                self.need(n * dt.itemsize, what)
                if itype == 7:      # bool: any non-zero byte is true (llama.cpp: int8 != 0)
                    arr = np.frombuffer(self.buf, dtype=np.uint8, count=n, offset=self.pos) != 0
                else:
                    arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr
            if itype == T_STRING:
                if n > self.size // 8:
                    raise GGUFError(f"{self.path}: corrupt array length {n} in {_show(what)}")
                return self.strings(n, what)
            if itype == T_ARRAY:
                if n > self.size // 12:
                    raise GGUFError(f"{self.path}: corrupt array length {n} in {_show(what)}")
                return [self.value(T_ARRAY, what, depth + 1) for _ in range(n)]
            raise GGUFError(f"{self.path}: unknown array item type {itype} in {_show(what)}")
        raise GGUFError(f"{self.path}: unknown value type {vtype} in {_show(what)}")


class GGUFFile:
    """A GGUF file opened by memory map. `metadata` maps keys to Python values (numeric arrays as
    numpy arrays, string arrays as StringArray sequences, arrays of arrays as lists); `tensors`
    maps names to TensorInfo; `view(name)` gives a zero-copy numpy view of a tensor's raw data.

    A file that breaks a rule raises an InferError (GGUFError and subclasses) whose `partial`
    attribute is the GGUFFile as far as it was read (closed; `metadata` holds the keys read before
    the problem), for `infer inspect` to show."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.version = None
        self.metadata: dict = {}
        self.metadata_types: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.n_tensors_declared = None
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
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        self.size = size
        self.data = np.frombuffer(self._mmap, dtype=np.uint8)  # the whole file, read-only
        try:
            self._parse()
        except InferError as e:
            self.close()
            e.partial = self
            raise
        except BaseException:
            self.close()
            raise

    def _parse(self):
        c = _Cursor(self._mmap, self.size, self.path)
        path = self.path
        if bytes(self._mmap[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic {bytes(self._mmap[:4])!r})")
        c.pos = 4
        self.version = c.unpack("<I", 4, "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {self.version} (2 and 3 are supported)")
        n_tensors = c.unpack("<Q", 8, "tensor count")
        n_kv = c.unpack("<Q", 8, "metadata count")
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise GGUFError(f"{path}: corrupt header (tensor count {n_tensors}, metadata count {n_kv})")
        self.n_tensors_declared = n_tensors
        md, types = self.metadata, self.metadata_types
        for i in range(n_kv):
            key = c.key(i)
            if key in md:
                raise GGUFError(f"{path}: duplicate metadata key {key!r} (metadata #{i})")
            vtype = c.unpack("<I", 4, f"type of {_show(key)}")
            md[key] = c.value(vtype, key)
            types[key] = vtype
        align = DEFAULT_ALIGNMENT
        if "general.alignment" in md:
            align = md["general.alignment"]
            if types["general.alignment"] != 4:
                raise GGUFError(f"{path}: general.alignment must be a uint32, not "
                                f"{TYPE_NAMES.get(types['general.alignment'])}")
            if align == 0 or align & (align - 1):
                raise GGUFError(f"{path}: general.alignment must be a power of two, got {align}")
        self.alignment = align

        infos = []
        seen = set()
        for i in range(n_tensors):
            at = c.pos
            try:
                infos.append(self._tensor_info(c, i, seen))
            except InferError as e:
                # a header that declares more tensors than the file has: the infos read so far
                # end the file exactly when their data section starts where this unreadable one does
                if i and self._ends_file(infos, (at + align - 1) // align * align):
                    problem = str(e).removeprefix(f"{path}: ")
                    raise GGUFError(f"{path}: the header declares {n_tensors} tensors but the file holds "
                                    f"{i} tensor infos (tensor info #{i}: {problem})") from None
                raise
        extra = self._peek_info(c.pos, seen)
        if extra is not None:
            raise GGUFError(f"{path}: the header declares {n_tensors} tensors but another tensor info "
                            f"(tensor {_show(extra)}) follows the last one at offset {c.pos}")
        self.data_offset = (c.pos + align - 1) // align * align
        spans = []
        for name, dims, qt, off, nbytes in infos:
            start = self.data_offset + off
            if start + nbytes > self.size:
                raise GGUFError(f"{path}: truncated file or tensor outside the data section (tensor {_show(name)} "
                                f"at data offset {off} needs bytes {start}..{start + nbytes}, file has {self.size})")
            spans.append((start, start + nbytes, name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise TensorError(f"{path}: tensors {_show(an)} (bytes {a0}..{a1}) and {_show(bn)} "
                                  f"(bytes {b0}..{b1}) overlap")
        for name, dims, qt, off, nbytes in infos:
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qt, self.data_offset + off, nbytes)

    def _tensor_info(self, c, i, seen):
        """Read and check tensor info #i: (name, dims fastest first, qtype, data offset, nbytes)."""
        path = self.path
        at = c.pos
        n = c.unpack("<Q", 8, f"name of tensor info #{i}")
        if n > MAX_NAME:
            raise GGUFError(f"{path}: tensor info #{i} at offset {at}: name is {n} bytes long "
                            f"(at most {MAX_NAME}, llama.cpp's GGML_MAX_NAME)")
        c.pos = at
        raw = c.raw_string(f"name of tensor info #{i}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{path}: tensor info #{i} at offset {at}: name {raw!r} is not valid UTF-8") from None
        shown = _show(name)
        if name in seen:
            raise TensorError(f"{path}: duplicate tensor name {shown} (tensor info #{i})")
        seen.add(name)
        nd = c.unpack("<I", 4, f"dimension count of tensor {shown}")
        if not 1 <= nd <= MAX_DIMS:
            raise TensorError(f"{path}: tensor {shown} has {nd} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [c.unpack("<Q", 8, f"dimensions of tensor {shown}") for _ in range(nd)]
        for j, d in enumerate(dims):
            if d == 0 or d > INT64_MAX:
                what = "0" if d == 0 else f"{d - 2**64} (negative as int64)"
                raise TensorError(f"{path}: tensor {shown} dimension {j} is {what}: shape {dims}")
        count = 1
        for d in dims:
            count *= d
        if count >= INT64_MAX:
            raise TensorError(f"{path}: tensor {shown} has {count} elements (shape {dims}): does not fit int64")
        tid = c.unpack("<I", 4, f"type of tensor {shown}")
        qt = qtype_by_id(tid)
        if qt is None:
            raise UnsupportedError(f"{path}: tensor {shown} has unsupported type id {tid}")
        if dims[0] % qt.block_size:
            raise TensorError(f"{path}: tensor {shown} row length {dims[0]} is not a multiple "
                              f"of the {qt.name} block size {qt.block_size}")
        off = c.unpack("<Q", 8, f"offset of tensor {shown}")
        if off % self.alignment:
            raise TensorError(f"{path}: tensor {shown} data offset {off} is not a multiple of the "
                              f"alignment {self.alignment}")
        return name, dims, qt, off, count // qt.block_size * qt.type_size

    def _ends_file(self, infos, data_offset) -> bool:
        end = data_offset + max(off + nbytes for _, _, _, off, nbytes in infos)
        return 0 <= self.size - end < self.alignment

    def _peek_info(self, pos, seen):
        """The name of a well-formed tensor info at `pos` (after the last declared one), else None:
        a header that declares fewer tensors than the file holds. Padding (zeros) and tensor data
        do not pass: a printable ASCII name of 1..63 bytes, 1..4 dimensions, a known type dividing
        the rows, an aligned offset and an extent inside the file are all needed."""
        c = _Cursor(self._mmap, self.size, self.path)
        c.pos = pos
        try:
            n = c.unpack("<Q", 8, "")
            if not 1 <= n <= MAX_NAME:
                return None
            c.pos = pos
            name = c.raw_string("").decode("ascii")
            if not name.isprintable() or name in seen:
                return None
            nd = c.unpack("<I", 4, "")
            if not 1 <= nd <= MAX_DIMS:
                return None
            dims = [c.unpack("<Q", 8, "") for _ in range(nd)]
            qt = qtype_by_id(c.unpack("<I", 4, ""))
            off = c.unpack("<Q", 8, "")
        except (InferError, UnicodeDecodeError):
            return None
        if qt is None or any(not 0 < d <= INT64_MAX for d in dims) or dims[0] % qt.block_size \
                or off % self.alignment:
            return None
        count = 1
        for d in dims:
            count *= d
        if c.pos + off + count // qt.block_size * qt.type_size > self.size:
            return None
        return name

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
