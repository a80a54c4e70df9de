"""The GGUF reader's string arrays (gguf_file.StringArray): a vocabulary decoded item by item from
the file's bytes behaves like the list gguf's own reader gives, and damaged arrays are refused."""
from __future__ import annotations

import struct

import pytest

from infer.errors import GGUFError
from infer.gguf_file import GGUFFile, StringArray


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, items: list[bytes], tail=b"", n_declared=None):
    """A tensor-less GGUF v3 file with one string array `t.words` and one u32 `t.after`."""
    n = len(items) if n_declared is None else n_declared
    body = (_s(b"t.words") + struct.pack("<IIQ", 9, 8, n) + b"".join(_s(x) for x in items)
            + _s(b"t.after") + struct.pack("<II", 4, 7) + tail)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + body)
    return path


def test_string_array_matches_gguf_reader(smollm2_path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(smollm2_path)
    f = r.fields["tokenizer.ggml.merges"]
    ref = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    with GGUFFile(smollm2_path) as g:
        merges = g.metadata["tokenizer.ggml.merges"]
        assert isinstance(merges, StringArray) and len(merges) == len(ref) > 40000
        assert list(merges) == ref and merges == ref
        assert merges[0] == ref[0] and merges[-1] == ref[-1] and merges[12345] == ref[12345]
        assert merges[100:105] == ref[100:105] and merges[::9999] == ref[::9999]
        assert g.metadata["llama.block_count"] == 30          # keys after the arrays parse on


def test_string_array_edge_cases(tmp_path):
    words = [b"a", b"", "\u0120the".encode(), b"\xff\xfe", "\u4e2d".encode() * 3]
    with GGUFFile(write_gguf(tmp_path / "w.gguf", words)) as g:
        a = g.metadata["t.words"]
        assert g.metadata["t.after"] == 7
        assert list(a) == ["a", "", "\u0120the", "\ufffd\ufffd", "\u4e2d\u4e2d\u4e2d"]
        assert a[-2] == "\ufffd\ufffd" and a[1] == "" and len(a) == 5
        assert a == ["a", "", "\u0120the", "\ufffd\ufffd", "\u4e2d" * 3] and a != ["a"]
        with pytest.raises(IndexError):
            a[5]
        with pytest.raises(IndexError):
            a[-6]
        with pytest.raises(TypeError):
            hash(a)
    with GGUFFile(write_gguf(tmp_path / "e.gguf", [])) as g:
        assert len(g.metadata["t.words"]) == 0 and list(g.metadata["t.words"]) == []


def test_damaged_string_arrays(tmp_path):
    p = write_gguf(tmp_path / "n.gguf", [b"ab", b"cd"], n_declared=5)   # more items declared than there are
    with pytest.raises(GGUFError, match="n.gguf: (truncated file|corrupt string length)"):
        GGUFFile(p)
    good = write_gguf(tmp_path / "g.gguf", [b"ab", b"cd"]).read_bytes()
    i = good.index(b"ab") - 8                                 # the first item's length: huge
    bad = good[:i] + struct.pack("<Q", 1 << 60) + good[i + 8:]
    (tmp_path / "big.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match=r"big.gguf: corrupt string length \d+ in t.words at offset %d" % i):
        GGUFFile(tmp_path / "big.gguf")
    (tmp_path / "cut.gguf").write_bytes(good[:good.index(b"cd") + 1])
    with pytest.raises(GGUFError, match="cut.gguf: truncated file"):
        GGUFFile(tmp_path / "cut.gguf")


def test_value_kinds_and_partial_read(tmp_path):
    """Bool arrays read as numpy bools (any non-zero byte true, as llama.cpp reads them), arrays
    of arrays as lists; a refused file's error carries what was read before the problem."""
    import numpy as np
    from gguf_fixtures import ARR, BOOL, STR, U8, U32, gguf_bytes
    body = gguf_bytes([("t.flags", ARR, (U8, [0, 1, 2])), ("t.nest", ARR, (ARR, [(STR, ["a"]), (U32, [7])]))], [])
    body = body.replace(struct.pack("<IIQ", 9, U8, 3), struct.pack("<IIQ", 9, BOOL, 3))   # as bools
    (tmp_path / "v.gguf").write_bytes(body)
    with GGUFFile(tmp_path / "v.gguf") as g:
        assert g.metadata["t.flags"].dtype == np.bool_ and g.metadata["t.flags"].tolist() == [False, True, True]
        assert list(g.metadata["t.nest"][0]) == ["a"] and g.metadata["t.nest"][1].tolist() == [7]
    (tmp_path / "d.gguf").write_bytes(gguf_bytes([("t.a", U32, 1), ("t.b", U32, 2), ("t.a", U32, 3)], []))
    with pytest.raises(GGUFError, match=r"d.gguf: duplicate metadata key 't.a' \(metadata #2\)") as e:
        GGUFFile(tmp_path / "d.gguf")
    assert e.value.partial.metadata == {"t.a": 1, "t.b": 2} and e.value.partial.version == 3
