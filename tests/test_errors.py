"""Bad input gives one clear line naming the file and the problem, and a non-zero exit, from the
CLI as a user runs it (subprocess), and an InferError subclass from the library."""
from __future__ import annotations

# a cold kernel cache adds the first-run notice line to stderr (cli/common.CompileNotice)
NOTICE = "compiling kernels for this CPU"
import os
import subprocess
import sys

import pytest

import infer
from gguf_fixtures import GT, write_tiny


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "infer.cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin, env=env, timeout=600)


def check_error(path, *needles, extra=()):
    r = run_cli("generate", path, "-p", "hi", "-n", "2", *extra)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(NOTICE)]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("bad")
    files = {}
    (d / "text.gguf").write_text("hello, I am not a model\n" * 10)
    files["not_gguf"] = d / "text.gguf"
    with open(smollm2_path, "rb") as f:
        (d / "trunc.gguf").write_bytes(f.read(5_000_000))
    files["truncated"] = d / "trunc.gguf"
    files["arch"] = write_tiny(d / "arch.gguf", smollm2_path, arch="gpt-neo")
    files["type"] = write_tiny(d / "type.gguf", smollm2_path, types={"blk.1.ffn_up.weight": GT.Q8_1})
    files["shape"] = write_tiny(d / "shape.gguf", smollm2_path, reshape={"blk.0.attn_k.weight": (64, 64)})
    files["missing_tensor"] = write_tiny(d / "missing.gguf", smollm2_path, drop=("blk.1.ffn_down.weight",))
    files["missing_key"] = write_tiny(d / "nokey.gguf", smollm2_path, md_drop=("llama.block_count",))
    files["key_type"] = write_tiny(d / "keytype.gguf", smollm2_path,
                                   md_override={"llama.embedding_length": "sixty-four"})
    files["ok"] = write_tiny(d / "ok.gguf", smollm2_path)
    return files


def test_not_a_gguf(bad):
    check_error(bad["not_gguf"], str(bad["not_gguf"]), "not a GGUF file")


def test_truncated(bad):
    check_error(bad["truncated"], str(bad["truncated"]), "truncated")


def test_unknown_architecture(bad):
    check_error(bad["arch"], "unknown architecture 'gpt-neo'")


def test_unsupported_tensor_type(bad):
    check_error(bad["type"], "blk.1.ffn_up.weight", "Q8_1", "not supported")


def test_shape_mismatch(bad):
    check_error(bad["shape"], "blk.0.attn_k.weight", "shape [64, 64]", "expected [32, 64]")


def test_missing_tensor(bad):
    check_error(bad["missing_tensor"], "missing tensor blk.1.ffn_down.weight")


def test_missing_metadata_key(bad):
    check_error(bad["missing_key"], "missing metadata key 'llama.block_count'")


def test_wrong_typed_metadata_key(bad):
    check_error(bad["key_type"], "'llama.embedding_length'", "expected an integer")


def test_prompt_longer_than_context(bad):
    msg = check_error(bad["ok"], "does not fit the context of 8 tokens", extra=("-c", "8", "-p", "word " * 20))
    assert "tokens" in msg


def test_missing_file_and_missing_prompt(tmp_path, bad):
    check_error(tmp_path / "nope.gguf", "nope.gguf", "cannot open")
    r = run_cli("generate", bad["ok"])
    assert r.returncode != 0 and "error: give the prompt" in r.stderr


def test_tiny_model_runs(bad):
    r = run_cli("generate", bad["ok"], "-p", "Hello", "-n", "4", "--temp", "0")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", bad["ok"])
    assert r.returncode == 0 and "blk.1.ffn_down.weight" in r.stdout


def test_library_errors(bad):
    for key in ("not_gguf", "truncated", "arch", "type", "shape", "missing_tensor", "missing_key", "key_type"):
        with pytest.raises(infer.InferError):
            infer.LLM(bad[key])
    with infer.LLM(bad["ok"], n_ctx=16) as llm:
        with pytest.raises(infer.TokenizerError, match="out of range"):
            llm.detokenize([10 ** 6])
        with pytest.raises(infer.InferError, match="out of range"):
            llm.generate([1, 2, 99999999], max_tokens=2)
        with pytest.raises(infer.ContextError):
            llm.generate("word " * 40, max_tokens=2)


def test_import_compiles_nothing():
    code = ("import sys, io, contextlib; b = io.StringIO()\n"
            "with contextlib.redirect_stdout(b): import infer\n"
            "assert b.getvalue() == '', b.getvalue()\n"
            "assert 'numba' not in sys.modules and 'infer.kernels' not in sys.modules, sorted(sys.modules)\n"
            "assert callable(infer.LLM) and callable(infer.SamplingParams)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
