"""GGUF container and vocabulary rules (the GGUF spec, llama.cpp's gguf.cpp and llama-vocab.cpp):
one small hand-made file per rule, refused by the library (infer.LLM, and GGUFFile for the
container rules) and by the CLI (`infer generate`, `infer inspect`) with one line that names the
file and the problem, as an InferError subclass / "error: ..." and exit status 1."""
from __future__ import annotations

# a cold kernel cache adds the first-run notice line to stderr (cli/common.CompileNotice)
NOTICE = "compiling kernels for this CPU"
import math
import os
import struct
import subprocess
import sys

import pytest

import infer
from gguf_fixtures import (ARR, BOOL, F32, F64, I32, STR, T_F32, T_Q8_0, U8, U32, U64, RawTensor,
                           gguf_bytes, tiny_model)
from infer.errors import GGUFError, InferError, MetadataError, TensorError, TokenizerError
from infer.gguf_file import GGUFFile

N_VOCAB = 272


def _kv_set(kv, key, vtype, value):
    return [(k, vtype, value) if k == key else (k, t, v) for k, t, v in kv]


def _kv_drop(kv, key):
    return [e for e in kv if e[0] != key]


def _t(ts, name):
    return next(t for t in ts if t.name == name)


def _extra_tensor(name, dims=(32,), type_id=T_F32):
    n = math.prod(dims)
    return RawTensor(name, list(dims), type_id, b"\0" * (4 * n if type_id == T_F32 else n // 32 * 34))


def _nested(depth):
    v = (U8, [1])
    for _ in range(depth - 1):
        v = (ARR, [v])
    return v


def _build(case):
    kv, ts = tiny_model()
    kw = {}
    tokens = next(v for k, _, v in kv if k == "tokenizer.ggml.tokens")[1]
    if case == "duplicate_key":
        kv = kv + [("llama.block_count", U32, 2)]
    elif case == "empty_key":
        kv = kv + [("", U32, 1)]
    elif case == "long_key":
        kv = kv + [("x" * 65536, U8, 1)]
    elif case == "key_not_utf8":
        kv = kv + [(b"general.\xff\xfe", U8, 1)]
    elif case == "long_tensor_name":
        ts = ts + [_extra_tensor("t" * 64)]
    elif case == "count_too_large":
        kw["n_tensors"] = len(ts) + 1
    elif case == "count_too_small":
        kw["n_tensors"] = len(ts) - 1
    elif case == "count_zero":
        kw["n_tensors"] = 0
    elif case == "duplicate_tensor":
        ts = ts + [_extra_tensor("output_norm.weight", (64,))]
    elif case == "unaligned_offset":
        _t(ts, "output.weight").offset = 16
    elif case == "overlapping_tensors":
        _t(ts, "output.weight").offset = 0
    elif case == "offset_outside":
        _t(ts, "output.weight").offset = 2**40
    elif case == "element_overflow":
        ts = ts + [RawTensor("big", [2**32, 2**31], T_F32, b"")]
    elif case == "zero_dims":
        ts = ts + [RawTensor("scalar", [], T_F32, b"\0" * 4)]
    elif case == "five_dims":
        ts = ts + [RawTensor("t5", [32, 1, 1, 1, 1], T_F32, b"\0" * 128)]
    elif case == "zero_dim":
        ts = ts + [RawTensor("z", [32, 0], T_F32, b"")]
    elif case == "negative_dim":
        ts = ts + [RawTensor("neg", [32, 2**64 - 1], T_F32, b"")]
    elif case == "row_not_block_multiple":
        ts = ts + [RawTensor("odd", [48, 2], T_Q8_0, b"\0" * 102)]
    elif case == "alignment_not_pow2":
        kv = _kv_set(kv, "general.alignment", U32, 48)
    elif case == "alignment_not_u32":
        kv = _kv_set(kv, "general.alignment", U64, 32)
    elif case == "nested_too_deep":
        kv = kv + [("general.deep", ARR, _nested(9))]
    elif case == "unknown_value_type":
        kv = kv + [("general.odd", 13, b"")]
    elif case == "bad_version":
        kw["version"] = 1
    elif case == "tokens_not_strings":
        kv = _kv_set(kv, "tokenizer.ggml.tokens", ARR, (U32, list(range(N_VOCAB))))
    elif case == "tokens_nested":
        kv = _kv_set(kv, "tokenizer.ggml.tokens", ARR, (ARR, [(STR, [t]) for t in tokens]))
    elif case == "scores_type":
        kv = kv + [("tokenizer.ggml.scores", ARR, (F64, [0.0] * N_VOCAB))]
    elif case == "scores_length":
        kv = kv + [("tokenizer.ggml.scores", ARR, (F32, [0.0] * (N_VOCAB - 1)))]
    elif case == "token_type_type":
        kv = _kv_set(kv, "tokenizer.ggml.token_type", ARR, (U8, [1] * N_VOCAB))
    elif case == "token_type_length":
        kv = _kv_set(kv, "tokenizer.ggml.token_type", ARR, (I32, [1] * (N_VOCAB + 1)))
    elif case == "merges_not_strings":
        kv = _kv_set(kv, "tokenizer.ggml.merges", ARR, (I32, [1, 2, 3]))
    elif case == "merges_nested":
        kv = _kv_set(kv, "tokenizer.ggml.merges", ARR, (ARR, [(STR, ["h e"])]))
    elif case == "bos_out_of_range":
        kv = _kv_set(kv, "tokenizer.ggml.bos_token_id", U32, N_VOCAB)
    elif case == "eos_negative":
        kv = _kv_set(kv, "tokenizer.ggml.eos_token_id", I32, -1)
    elif case == "unk_out_of_range":
        kv = kv + [("tokenizer.ggml.unknown_token_id", U32, 2**32 - 1)]
    elif case == "pad_out_of_range":
        kv = kv + [("tokenizer.ggml.padding_token_id", U32, 100000)]
    elif case == "sep_out_of_range":
        kv = kv + [("tokenizer.ggml.seperator_token_id", U32, N_VOCAB + 5)]
    elif case == "bos_not_integer":
        kv = _kv_set(kv, "tokenizer.ggml.bos_token_id", STR, "1")
    elif case == "add_bos_array":
        kv = _kv_set(kv, "tokenizer.ggml.add_bos_token", ARR, (BOOL, [True, False]))
    elif case == "vocab_size_mismatch":
        kv = _kv_set(kv, "llama.vocab_size", U32, N_VOCAB + 1)
    elif case == "layers_huge":
        kv = _kv_set(kv, "llama.block_count", U32, 1000)
    elif case == "rope_base_nan":
        kv = _kv_set(kv, "llama.rope.freq_base", F32, float("nan"))
    elif case == "eps_negative":
        kv = _kv_set(kv, "llama.attention.layer_norm_rms_epsilon", F32, -1.0)
    else:
        raise KeyError(case)
    return gguf_bytes(kv, ts, **kw)


# case -> (error class, text the message must hold, refused by GGUFFile itself)
CASES = {
    "duplicate_key": (GGUFError, "duplicate metadata key 'llama.block_count'", True),
    "empty_key": (GGUFError, "metadata key #22 at offset", True),
    "long_key": (GGUFError, "is 65536 bytes long (at most 65535)", True),
    "key_not_utf8": (GGUFError, "is not valid UTF-8", True),
    "long_tensor_name": (GGUFError, "name is 64 bytes long (at most 63", True),
    "count_too_large": (GGUFError, "the header declares 22 tensors but the file holds 21 tensor infos", True),
    "count_too_small": (GGUFError, "the header declares 20 tensors but another tensor info (tensor output.weight)", True),
    "count_zero": (GGUFError, "the header declares 0 tensors but another tensor info (tensor token_embd.weight)", True),
    "duplicate_tensor": (TensorError, "duplicate tensor name output_norm.weight", True),
    "unaligned_offset": (TensorError, "output.weight data offset 16 is not a multiple of the alignment 32", True),
    "overlapping_tensors": (TensorError, "overlap", True),
    "offset_outside": (GGUFError, "tensor output.weight at data offset 1099511627776", True),
    "element_overflow": (TensorError, "tensor big has 9223372036854775808 elements", True),
    "zero_dims": (TensorError, "tensor scalar has 0 dimensions (1 to 4 allowed)", True),
    "five_dims": (TensorError, "tensor t5 has 5 dimensions (1 to 4 allowed)", True),
    "zero_dim": (TensorError, "tensor z dimension 1 is 0", True),
    "negative_dim": (TensorError, "tensor neg dimension 1 is -1 (negative as int64)", True),
    "row_not_block_multiple": (TensorError, "tensor odd row length 48 is not a multiple of the Q8_0 block size 32", True),
    "alignment_not_pow2": (GGUFError, "general.alignment must be a power of two, got 48", True),
    "alignment_not_u32": (GGUFError, "general.alignment must be a uint32, not uint64", True),
    "nested_too_deep": (GGUFError, "arrays nested more than 8 deep in general.deep", True),
    "unknown_value_type": (GGUFError, "unknown value type 13 in general.odd", True),
    "bad_version": (GGUFError, "unsupported GGUF version 1", True),
    "tokens_not_strings": (TokenizerError, "tokenizer.ggml.tokens must be an array of strings, got an array of uint32", False),
    "tokens_nested": (TokenizerError, "tokenizer.ggml.tokens must be an array of strings, got an array of arrays", False),
    "scores_type": (TokenizerError, "tokenizer.ggml.scores must be an array of 272 float32 values (one per token), got an array of float64", False),
    "scores_length": (TokenizerError, "tokenizer.ggml.scores must be an array of 272 float32 values (one per token), got an array of float32 of 271 values", False),
    "token_type_type": (TokenizerError, "tokenizer.ggml.token_type must be an array of 272 int32 values (one per token), got an array of uint8", False),
    "token_type_length": (TokenizerError, "got an array of int32 of 273 values", False),
    "merges_not_strings": (TokenizerError, "tokenizer.ggml.merges must be an array of strings, got an array of int32", False),
    "merges_nested": (TokenizerError, "tokenizer.ggml.merges must be an array of strings, got an array of arrays", False),
    "bos_out_of_range": (TokenizerError, "tokenizer.ggml.bos_token_id is 272, outside the vocabulary of 272 tokens", False),
    "eos_negative": (TokenizerError, "tokenizer.ggml.eos_token_id is -1, outside the vocabulary", False),
    "unk_out_of_range": (TokenizerError, "tokenizer.ggml.unknown_token_id is 4294967295, outside", False),
    "pad_out_of_range": (TokenizerError, "tokenizer.ggml.padding_token_id is 100000, outside", False),
    "sep_out_of_range": (TokenizerError, "tokenizer.ggml.seperator_token_id is 277, outside", False),
    "bos_not_integer": (TokenizerError, "tokenizer.ggml.bos_token_id must be an integer token id, got a str", False),
    "add_bos_array": (TokenizerError, "tokenizer.ggml.add_bos_token must be a bool, got an array of bool", False),
    "vocab_size_mismatch": (TokenizerError, "vocabulary has 272 tokens but the model has 273 output rows", False),
    "layers_huge": (MetadataError, "llama.block_count is 1000 (at most 512", False),
    "rope_base_nan": (MetadataError, "llama.rope.freq_base must be a positive number, got nan", False),
    "eps_negative": (MetadataError, "layer_norm_rms_epsilon must be a non-negative number, got -1.0", False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    out = {}
    for case in CASES:
        (d / f"{case}.gguf").write_bytes(_build(case))
        out[case] = d / f"{case}.gguf"
    return out


def _check_message(msg, path, needle):
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert needle in msg, (needle, msg)


@pytest.mark.parametrize("case", list(CASES))
def test_library_refuses(files, case):
    cls, needle, container = CASES[case]
    path = files[case]
    with pytest.raises(cls) as e:
        infer.LLM(path, n_ctx=16, n_threads=1)
    _check_message(str(e.value), path, needle)
    if container:
        with pytest.raises(cls) as e:
            GGUFFile(path)
        _check_message(str(e.value), path, needle)
        assert e.value.partial.path == str(path)       # what was read, for `infer inspect`
    else:
        GGUFFile(path).close()


@pytest.fixture(scope="module")
def cli_main():
    from infer.cli import main as climain
    climain._register()
    orig, climain._register = climain._register, lambda: None
    yield climain.main
    climain._register = orig


def _run_main(main, capsys, *argv):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_cli_refuses(files, case, command, cli_main, capsys):
    cls, needle, container = CASES[case]
    path = files[case]
    argv = [command, path] + (["-p", "hi", "-n", "2", "-t", "1", "-c", "16"] if command == "generate" else [])
    code, out, err = _run_main(cli_main, capsys, *argv)
    assert code == 1
    # a cold kernel cache adds the first-run notice before the file is read (cli/common.CompileNotice)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(NOTICE)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    _check_message(lines[0], path, needle)
    assert "Traceback" not in out + err
    if command == "inspect" and case not in ("bad_version",):
        assert "general.architecture" in out        # what could be read comes first


def test_valid_files_load(tmp_path, cli_main, capsys):
    """The limits themselves are allowed: a 65535-byte key, a 63-byte tensor name, 4 dimensions,
    arrays nested 8 deep; the tiny model generates and inspect exits 0."""
    kv, ts = tiny_model()
    kv = kv + [("k" * 65535, U8, 1), ("general.deep", ARR, _nested(8))]
    ts = ts + [_extra_tensor("n" * 63), _extra_tensor("four", (32, 1, 1, 2))]
    p = tmp_path / "limits.gguf"
    p.write_bytes(gguf_bytes(kv, ts))
    with GGUFFile(p) as g:
        assert g.tensors["four"].shape == (2, 1, 1, 32) and ("n" * 63) in g.tensors
        assert g.metadata["general.deep"][0][0][0][0][0][0][0].tolist() == [1]
    with infer.LLM(p, n_ctx=16, n_threads=1) as llm:
        assert len(llm.generate("Hello", max_tokens=2).tokens) >= 1
    code, out, err = _run_main(cli_main, capsys, "inspect", p)
    assert code == 0 and "four" in out and not err


def _cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "infer.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["count_too_small", "bos_out_of_range"])
def test_cli_subprocess(files, case):
    """As a user runs it: one "error:" line, status 1, no traceback, for generate and inspect."""
    _, needle, _ = CASES[case]
    for argv in (["generate", files[case], "-p", "hi", "-n", "2", "-c", "16"], ["inspect", files[case]]):
        r = _cli(*argv)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(NOTICE)]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        _check_message(lines[0], files[case], needle)


def test_inspect_prints_partial_metadata(files, cli_main, capsys):
    """A file refused in its tensor infos: inspect still shows every key read before the problem."""
    code, out, err = _run_main(cli_main, capsys, "inspect", files["long_tensor_name"])
    assert code == 1 and "tokenizer.ggml.merges" in out and "22 tensors declared" in out
    assert err.startswith("error: ") and "name is 64 bytes long" in err


def test_key_is_raw_bytes_checked(tmp_path):
    """Key length is the field's value: a key claiming more bytes than the file has is truncation."""
    data = bytearray(gguf_bytes([("general.architecture", STR, "llama")], []))
    data[24:32] = struct.pack("<Q", 1000)
    (tmp_path / "k.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="corrupt string length|truncated"):
        GGUFFile(tmp_path / "k.gguf")


def test_errors_are_infer_errors():
    for cls, _, _ in CASES.values():
        assert issubclass(cls, InferError)


def test_messages_stay_one_line(tmp_path):
    """Names with control characters are escaped in messages (the file's bytes are not trusted)."""
    kv, ts = tiny_model()
    p = tmp_path / "nl.gguf"
    p.write_bytes(gguf_bytes(kv + [("tokenizer.ggml.x\ny_token_id", U32, 9999)],
                             ts + [_extra_tensor("a\nb"), _extra_tensor("a\nb")]))
    with pytest.raises(TensorError, match=r"duplicate tensor name 'a\\nb'") as e:
        GGUFFile(p)
    assert "\n" not in str(e.value)
    p.write_bytes(gguf_bytes(kv + [("tokenizer.ggml.x\ny_token_id", U32, 9999)], ts))
    with pytest.raises(TokenizerError, match=r"'tokenizer.ggml.x\\ny_token_id' is 9999, outside") as e:
        infer.LLM(p, n_ctx=16, n_threads=1)
    assert "\n" not in str(e.value)
