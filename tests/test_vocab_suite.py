"""infer.tokenizer against llama.cpp's own tokenizer suite: models/ggml-vocab-*.gguf (vocabulary only)
with ggml-vocab-*.gguf.inp / .out, read and run as llama.cpp's tests/test-tokenizer-0.cpp does
(add_special false, parse_special false; every string's ids must match exactly).

The suite ships in llama.cpp's source tree (and in llama-cpp-python's sdist, vendor/llama.cpp). Found
at $INFER_LLAMACPP_SRC, /work/llamacpp/src, /work/llamacpp/sdist/vendor/llama.cpp, or where
tests/fetch_llamacpp_vocabs.sh puts it ($INFER_TEST_CACHE/llama.cpp-<version>, default
~/.cache/infer-tests); skipped, with the places looked at, when none has it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from infer.tokenizer import Tokenizer

LLAMACPP_VERSION = "0.3.36"      # llama-cpp-python's sdist the fetch script takes the suite from
CACHE = Path(os.environ.get("INFER_TEST_CACHE", Path.home() / ".cache" / "infer-tests"))
SEPARATOR = b"\n__ggml_vocab_test__\n"
# the vocabularies with .inp/.out in llama-cpp-python 0.3.36's llama.cpp (aquila, baichuan, gpt-neox and
# nomic-bert-moe ship without strings to test)
EXPECTED = ("bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
            "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder")


def candidates() -> list[Path]:
    env = os.environ.get("INFER_LLAMACPP_SRC")
    places = [Path(env)] if env else []
    return places + [Path("/work/llamacpp/src"), Path("/work/llamacpp/sdist/vendor/llama.cpp"),
                     CACHE / f"llama.cpp-{LLAMACPP_VERSION}"]


def models_dir() -> Path | None:
    for root in candidates():
        if any((root / "models").glob("ggml-vocab-*.gguf.inp")):
            return root / "models"
    return None


MODELS = models_dir()
SKIP = ("llama.cpp's tokenizer suite (models/ggml-vocab-*.gguf.inp) is in none of "
        + ", ".join(map(str, candidates())) + ": run tests/fetch_llamacpp_vocabs.sh or set INFER_LLAMACPP_SRC")
VOCABS = sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in MODELS.glob("ggml-vocab-*.gguf.inp")) \
    if MODELS else []


def read_cases(vocab: Path) -> dict[bytes, list[int]]:
    """test-tokenizer-0.cpp's read_tests: inputs split at the separator line (text after the last one,
    if any, is one more input), one line of space-separated ids per input; a repeated input keeps its
    last ids (a std::map)."""
    raw = vocab.with_name(vocab.name + ".inp").read_bytes()
    lines = vocab.with_name(vocab.name + ".out").read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    assert len(inputs) == len(lines), f"{vocab.name}: {len(inputs)} inputs but {len(lines)} output lines"
    return {text: [int(t) for t in line.split()] for text, line in zip(inputs, lines)}


@pytest.mark.skipif(MODELS is None, reason=SKIP)
def test_suite_complete():
    """Every vocabulary of the pinned suite is there (a partial fetch would pass the rest silently)."""
    assert not set(EXPECTED) - set(VOCABS), f"{MODELS}: missing {sorted(set(EXPECTED) - set(VOCABS))}"


@pytest.mark.skipif(MODELS is None, reason=SKIP)
@pytest.mark.parametrize("name", VOCABS or ["none"])
def test_vocab(name):
    vocab = MODELS / f"ggml-vocab-{name}.gguf"
    cases = read_cases(vocab)
    tok = Tokenizer.from_gguf(vocab)
    bad = []
    for text, ids in cases.items():
        got = tok.encode(text, add_bos=False, add_eos=False, special=False)
        if got != ids:
            bad.append(f"{text.decode('utf-8', 'backslashreplace')!r}: expected {ids}, got {got}")
    assert not bad, f"{name}: {len(bad)} of {len(cases)} strings differ:\n" + "\n".join(bad[:8])
