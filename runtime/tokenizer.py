"""Text <-> token ids from a GGUF vocabulary, matching llama.cpp's tokenizer id for id.

Four vocabulary kinds, chosen by `tokenizer.ggml.model`:
  "gpt2"   byte-level BPE: the `tokenizers` library's BPE model built from the GGUF tokens and merges,
           behind the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`.
  "gemma4" BPE over raw UTF-8 (no byte-level map): spaces escaped to U+2581, the text cut only into
           runs of newlines and runs of the rest, `<0xXX>` byte fallback (the same library model).
  "llama"  SentencePiece-style: llama.cpp's SPM algorithm in plain Python (score-ordered bigram
           merges over characters, `<0xXX>` byte fallback, spaces escaped to U+2581).
  "bert"   WordPiece (llama.cpp's WPM): BERT normalisation, greedy longest match per word in plain
           Python; add_eos appends the separator token.
All four give llama.cpp's ids on its tokenizer suite (tests/test_vocab_suite.py).

Special tokens are split out of the text first, as llama.cpp does: user-defined tokens always,
control tokens only with `special=True` (longest token text first).

Invalid UTF-8: llama.cpp tokenizes bytes. Pass such input as the str that
`data.decode("utf-8", "surrogateescape")` gives (or pass the bytes themselves); encode turns the
escaped bytes back into the same bytes. Stray bytes and truncated sequences then tokenize as in
llama.cpp; overlong forms and encoded surrogates, which Python's decoder splits into single invalid
bytes, may not.

Decoding concatenates each token's piece (llama.cpp `token_to_piece`): control and unknown tokens
render as their text, or as nothing with `skip_special=True`. Bytes that are not valid UTF-8 decode
to U+FFFD; `StreamingDetokenizer` holds back an incomplete character until its last byte arrives.
llama.cpp's `clean_up_tokenization_spaces` pass (" ." -> ".") is not applied.
"""
from __future__ import annotations

import codecs
import heapq
import logging
import operator
import os
import re

import numpy as np

from .errors import InferError, TokenizerError
from .gguf_file import StringArray, _show

log = logging.getLogger(__name__)

# token attributes: llama.cpp's llama_token_attr bits; GGUF token_type 0..6 maps to one of them
UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1, 2, 4, 8, 16, 32
_TYPE_TO_ATTR = np.array([UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE], dtype=np.int32)
_SKIPPABLE = CONTROL | UNKNOWN          # rendered only when special tokens are kept
_SPECIAL_TEXT = CONTROL | UNKNOWN | USER_DEFINED   # split out of the text before tokenizing

# token texts llama.cpp treats as end-of-turn / FIM / end-of-generation (llama-vocab.cpp, load())
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_NAMES = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")

# BPE pre-tokenizers: llama.cpp's regexes, applied one after the other (matches and the text between
# them both become pieces), then GPT-2's byte-to-unicode mapping.
_GPT2_RX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RX = _LLAMA3_RX.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"     # llama.cpp's stand-ins for Lu / Ll
_CASED = r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + r"+%s|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*%s"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"


def _char_class(ranges: str) -> str:
    """A regex character class body from 'XXXX-YYYY ZZZZ ...' (hex code points and ranges)."""
    out = []
    for item in ranges.split():
        lo, _, hi = item.partition("-")
        out.append(chr(int(lo, 16)) + ("-" + chr(int(hi, 16)) if hi else ""))
    return "".join(out)


# DeepSeek LLM's letter class (its tokenizer.json's hand-listed cased letters, not all of \p{L}) and the
# CJK / Hangul run both DeepSeek pre-tokenizers isolate
_DEEPSEEK_LETTERS = _char_class(
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376-377 37B-37D 37F 386 388-38A 38C "
    "38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD 1C90-1CBA 1CBD-1CBF 1D00-1D2B "
    "1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D 1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 "
    "1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 "
    "2115 2119-211D 2124 2126 2128 212A-212D 212F-2134 2139 213C-213F 2145-2149 214E 2183-2184 2C00-2C7B "
    "2C7E-2CE4 2CEB-2CEE 2CF2-2CF3 A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 "
    "FB13-FB17 FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2 118A0-118DF "
    "1E900-1E943")
_DEEPSEEK_PUNCT = _char_class("21-2F 3A-7E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002")
_DEEPSEEK_CJK = "[" + _char_class("4E00-9FA5 800-4E00 AC00-D7FF") + "]+"
_PRE_REGEXES = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RX, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2_RX],
    "smollm": [r"\p{N}", _GPT2_RX],
    "llama3": [_LLAMA3_RX],
    "qwen2": [_QWEN2_RX],
    "gpt4o": [_CASED % (_CONTRACTION, _CONTRACTION) + r"|\p{N}{1,3}" + _TAIL],
    "tekken": [_CASED % ("", "") + r"|\p{N}" + _TAIL],
    "qwen35": [_QWEN2_RX.replace(r"\p{L}+|", r"[\p{L}\p{M}]+|")            # qwen2, marks kept with letters
               .replace(r" ?[^\s\p{L}\p{N}]", r" ?[^\s\p{L}\p{M}\p{N}]")],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RX, r"[0-9][0-9][0-9]"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"],
    "deepseek-llm": [r"[\r\n]", r"\s?[" + _DEEPSEEK_LETTERS + "]+", r"\s?[" + _DEEPSEEK_PUNCT + "]+", r"\s+$",
                     _DEEPSEEK_CJK, r"\p{N}+"],
}
# tokenizer.ggml.pre -> (regex set, ignore_merges, default add_bos)
_PRE_TYPES = {name: ("llama3", True, True) for name in
              ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")}
_PRE_TYPES.update({name: ("llama3", False, False) for name in ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe")})
_PRE_TYPES.update({name: ("gpt2", False, False) for name in
                   ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                    "mellum", "modern-bert", "mpt", "olmo", "exaone4", "roberta-bpe", "jina-v1-en", "jina-v2-code")})
_PRE_TYPES.update({name: ("qwen2", False, False) for name in
                   ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan")})
_PRE_TYPES.update({name: ("smollm", False, False) for name in
                   ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")})
_PRE_TYPES.update({name: ("gpt4o", False, False) for name in ("gpt-4o", "llama4", "kanana2")})
_PRE_TYPES["tekken"] = ("tekken", True, True)
_PRE_TYPES.update({name: (name, False, False) for name in ("qwen35", "falcon", "deepseek-coder", "deepseek-llm")})
# tokenizer model gemma4 (and this gpt2-model alias llama.cpp treats the same): no regexes, see _gemma4_encode
_PRE_TYPES.update({name: ("gemma4", False, True) for name in ("gemma4", "granite-embed-multi-311m")})
_PRE_TYPES["default"] = ("default", False, False)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


_BYTE_ENC = _byte_to_unicode()
_BYTE_DEC = {c: b for b, c in _BYTE_ENC.items()}
_UTF8_LEN = bytes([1] * 12 + [2, 2, 3, 4])      # sequence length from a lead byte's high nibble
_NEWLINE_RUNS = re.compile(r"\n+|[^\n]+")       # gemma4's only pre-tokenizer split


def _describe(v) -> str:
    """What a metadata value is, for messages: 'an array of int32', 'an array of arrays', 'a str'."""
    if isinstance(v, np.ndarray):
        return f"an array of {v.dtype}" if v.ndim == 1 else f"a {v.ndim}-D array"
    if isinstance(v, StringArray):
        return "an array of strings"
    if isinstance(v, (list, tuple)):
        return "an array of arrays" if v and isinstance(v[0], (list, np.ndarray, StringArray)) else "a list"
    name = type(v).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_array(md, key, source, n, dtype):
    """md[key] (absent: None) as a 1-D numpy array of `dtype` and exactly n values (GGUF's
    tokenizer.ggml.scores is float32, token_type int32, one per token; llama.cpp reads them as
    raw float / int arrays of the vocabulary's length)."""
    v = md.get(key)
    if v is None:
        return None
    if not (isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == dtype) or len(v) != n:
        got = _describe(v) + (f" of {len(v)} values" if hasattr(v, "__len__") else "")
        raise TokenizerError(f"{source}: {key} must be an array of {n} {np.dtype(dtype).name} values "
                             f"(one per token), got {got}")
    return v


def _string_array(v, key, source):
    """v as a sequence of str (a GGUF string array), else a TokenizerError."""
    if isinstance(v, StringArray):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v):
        return v
    raise TokenizerError(f"{source}: {key} must be an array of strings, got {_describe(v)}")


def _flag(md, key, default, source) -> bool:
    v = md.get(key, default)
    if not isinstance(v, (bool, int, np.bool_, np.integer)):
        raise TokenizerError(f"{source}: {key} must be a bool, got {_describe(v)}")
    return bool(v)


_ID_PREFIX, _ID_SUFFIX = "tokenizer.ggml.", "_token_id"


def _check_special_ids(md, source, n):
    """Every tokenizer.ggml.*_token_id (bos, eos, unknown, seperator, padding, cls, mask, eot, eom,
    fim_*) must be an integer id inside the vocabulary (llama.cpp only warns and ignores a bad one;
    a file that names a token it does not have is refused here)."""
    for key, v in md.items():
        if not (key.startswith(_ID_PREFIX) and key.endswith(_ID_SUFFIX)):
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TokenizerError(f"{source}: {_show(key)} must be an integer token id, got {_describe(v)}")
        if not 0 <= v < n:
            raise TokenizerError(f"{source}: {_show(key)} is {int(v)}, outside the vocabulary of {n} tokens")


class Tokenizer:
    """A GGUF vocabulary: `encode` text to ids and `decode` ids to text exactly as llama.cpp does."""

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """Load the vocabulary of a GGUF file (metadata only; tensors are not touched)."""
        from .gguf_file import GGUFFile
        try:
            f = GGUFFile(path)
        except InferError as e:
            raise TokenizerError(str(e)) from None
        try:
            return cls.from_metadata(f.metadata, os.fspath(path))
        finally:
            f.close()

    @classmethod
    def from_metadata(cls, metadata: dict, source: str) -> "Tokenizer":
        """Build from GGUF metadata (key -> value) already read; `source` names the file in errors."""
        return cls(metadata, str(source))

    def __init__(self, md: dict, source: str):
        self.source = source
        model = md.get("tokenizer.ggml.model")
        if not isinstance(model, str):
            raise TokenizerError(f"{source}: no tokenizer.ggml.model key: the file carries no vocabulary")
        if model not in ("gpt2", "llama", "gemma4", "bert"):
            raise TokenizerError(f"{source}: tokenizer model {model!r} is not supported "
                                 "(gpt2, llama, gemma4 and bert are)")
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is missing: the file carries no vocabulary")
        tokens = _string_array(tokens, "tokenizer.ggml.tokens", source)
        if not tokens:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is empty")
        n = len(tokens)
        _check_special_ids(md, source, n)
        words = tokens.tolist() if isinstance(tokens, StringArray) else list(tokens)
        if "" in words:
            words = [t or f"[EMPTY_{i}]" for i, t in enumerate(words)]
            tokens = words
        # a BPE vocabulary's text is needed after loading only to decode a token the first time:
        # from the file's StringArray (bytes); the strings and the text -> id map live while the
        # tokenizer is built (the library keeps its own), ~7 MiB less for a 49k vocabulary
        self.model, self.n_vocab, self._tokens = model, n, words if model == "llama" else tokens
        self._ids = dict(zip(words, range(n)))
        if len(self._ids) != n:
            raise TokenizerError(f"{source}: the vocabulary has duplicate tokens ({n - len(self._ids)} of them)")

        types = _check_array(md, "tokenizer.ggml.token_type", source, n, np.int32)
        scores = _check_array(md, "tokenizer.ggml.scores", source, n, np.float32)
        if types is None:
            attr = np.full(n, NORMAL, dtype=np.int32)
        else:
            attr = _TYPE_TO_ATTR[np.where((types >= 0) & (types <= 6), types, 0)]
        self._attr = attr

        is_spm, is_wpm = model == "llama", model == "bert"
        # gemma4: BPE over raw UTF-8 with spaces escaped to U+2581 (no byte-level mapping), whatever
        # tokenizer.ggml.pre says; llama.cpp always adds its BOS. bert: WordPiece (llama.cpp's WPM)
        self.pre = ("default" if is_spm or is_wpm else "gemma4" if model == "gemma4"
                    else md.get("tokenizer.ggml.pre", "default"))
        if not isinstance(self.pre, str):
            raise TokenizerError(f"{source}: tokenizer.ggml.pre must be a string, got {_describe(self.pre)}")
        pre_kind, ignore_merges, add_bos = ("default", False, True) if is_spm or is_wpm else self._pre_type(self.pre)
        self._escaped = model != "gpt2" or pre_kind == "gemma4"     # pieces hold U+2581 for spaces
        self.add_bos = _flag(md, "tokenizer.ggml.add_bos_token", add_bos, source) or pre_kind == "gemma4"
        # WPM: add_eos appends the separator ([SEP]), as llama.cpp's add_special does
        self.add_eos = _flag(md, "tokenizer.ggml.add_sep_token" if is_wpm else "tokenizer.ggml.add_eos_token",
                             is_wpm, source)
        self.add_space_prefix = is_spm and _flag(md, "tokenizer.ggml.add_space_prefix", True, source)

        defaults = ({"bos": 1, "eos": 2, "unk": 0} if is_spm else {} if model == "gemma4"
                    else {"bos": 101, "unk": 100, "sep": 102, "pad": 0} if is_wpm else {"bos": 11, "eos": 11})
        if pre_kind == "llama3" and self.pre in ("glm4", "chatglm-bpe"):
            defaults["bos"] = None

        def special(name, key):
            v = md.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(v, (int, np.integer)) and 0 <= v < n:
                return int(v)
            d = defaults.get(name)
            return d if d is not None and d < n else None

        self.bos_id, self.eos_id, self.unk_id = special("bos", "bos"), special("eos", "eos"), special("unk", "unknown")
        self.pad_id = special("pad", "padding")
        self._end_id = special("sep", "seperator") if is_wpm else self.eos_id     # what add_eos appends
        self._mark_special(md, special)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{source}: tokenizer.ggml.add_bos_token is true but there is no BOS token id")

        # special tokens split out of the text, longest (in UTF-8 bytes) first
        sp = np.flatnonzero(self._attr & _SPECIAL_TEXT).tolist()
        sp.sort(key=lambda i: -len(words[i].encode()))
        self._special_order = [(words[i], i, int(self._attr[i])) for i in sp]
        self._special_index: dict[str, list[int]] = {}     # first <= 3 characters -> positions in order
        for pos, (t, _, _) in enumerate(self._special_order):
            self._special_index.setdefault(t[:3], []).append(pos)
        self._pieces: list = [None] * n

        if is_wpm:
            self._encode_text = self._wpm_encode
            # BertNormalizer options (llama.cpp: lowercase by default, accents stripped when lowercasing)
            self._lowercase = _flag(md, "tokenizer.ggml.normalizer.lowercase", True, source)
            self._strip_accents = _flag(md, "tokenizer.ggml.normalizer.strip_accents", self._lowercase, source)
            self._max_len = max(map(len, words))
        elif is_spm:
            self._encode_text = self._spm_encode
            self._scores = (np.zeros(n) if scores is None else scores.astype(np.float64)).tolist()
            self._byte_ids = [self._spm_byte_token(b) for b in range(256)]
        else:
            self._encode_text = self._bpe_encode if pre_kind != "gemma4" else self._gemma4_encode
            self._hf = self._build_bpe(md, pre_kind, ignore_merges)
            self._ids = None            # the SentencePiece path's; BPE asks the library

    # --- loading helpers ----------------------------------------------------------------------------
    def _pre_type(self, pre):
        if not isinstance(pre, str) or pre not in _PRE_TYPES:
            log.warning("%s: unknown BPE pre-tokenizer %r, using the default one (token ids may differ "
                        "from llama.cpp)", self.source, pre)
            pre = "default"
        return _PRE_TYPES[pre]

    def _mark_special(self, md, special):
        """llama.cpp's by-name fix-ups: EOT/EOM/FIM/EOG-looking tokens become control tokens, control
        tokens named 'unused' become unused, and the end-of-generation set is gathered."""
        ids, attr = self._ids, self._attr

        def find(names, first_only=False):
            found = [ids[t] for t in names if t in ids][:1 if first_only else None]
            for i in found:
                attr[i] |= CONTROL
            return found

        def by_key_or_name(name, key, names):
            tid = special(name, key)
            return tid if tid is not None else next(iter(find(names, first_only=True)), None)

        eot = by_key_or_name("eot", "eot", _EOT_NAMES)
        eom = by_key_or_name("eom", "eom", ("<|eom_id|>",))
        fim = {k: by_key_or_name(k, f"fim_{k}", names) for k, names in _FIM_NAMES.items()}
        for i in np.flatnonzero((attr & CONTROL) & ~(attr & UNUSED)).tolist():
            if "unused" in self._tokens[i]:
                attr[i] |= UNUSED
        eog = {fim[k] for k in ("pad", "rep", "sep")} | set(find(_EOG_NAMES)) | {self.eos_id, eot, eom}
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):   # gpt-oss: always rendered
            if t in ids:
                attr[ids[t]] = USER_DEFINED
        texts = {self._tokens[i]: i for i in eog if i is not None}
        if "<|return|>" in texts and "<|end|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts) \
                or "<|calls|>" in texts and "<|flush|>" in texts and "<|end|>" in texts:
            eog.discard(texts["<|end|>"])
            attr[texts["<|end|>"]] = USER_DEFINED
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])
            attr[texts["</s>"]] = NORMAL
        self.eot_id = eot
        self.eot_ids = frozenset(i for i in eog if i is not None)

    def _build_bpe(self, md, pre_kind, ignore_merges):
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError(f"{self.source}: tokenizer.ggml.merges is missing (a BPE vocabulary needs them)")
        merges = _string_array(merges, "tokenizer.ggml.merges", self.source)
        halves = merges.tolist(sep=" ") if isinstance(merges, StringArray) else None
        if halves is not None:          # every merge has one space, none first: split in one pass
            it = iter(halves)
            pairs = list(zip(it, it))
        else:
            merges = list(merges)
            cut = [m.find(" ", 1) for m in merges]
            if -1 in cut:
                raise TokenizerError(f"{self.source}: bad BPE merge {merges[cut.index(-1)]!r} (expected 'left right')")
            pairs = [(m[:p], m[p + 1:]) for m, p in zip(merges, cut)]
        del merges, halves
        raw = pre_kind == "gemma4"      # merges over characters; unknown characters as <0xXX> byte tokens
        try:
            bpe = models.BPE(self._ids, pairs, ignore_merges=ignore_merges, byte_fallback=raw)
        except Exception as e:  # the library reports merges whose parts are not tokens
            why = " ".join(str(e).split())   # one line, whatever the tokens hold
            raise TokenizerError(f"{self.source}: inconsistent BPE vocabulary ({why})") from None
        hf = HFTokenizer(bpe)
        if not raw:
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in _PRE_REGEXES[pre_kind]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    def _spm_byte_token(self, b):
        t = self._ids.get(f"<0x{b:02X}>")
        if t is None and b < 0x80:
            t = self._ids.get(chr(b))
        return t

    # --- encode -------------------------------------------------------------------------------------
    def encode(self, text, add_bos: bool | None = None, special: bool = False, *,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text` (str; or bytes, tokenized as raw bytes like llama.cpp).

        add_bos / add_eos: None follows the file (tokenizer.ggml.add_bos_token / add_eos_token), as
        llama.cpp's add_special=True does. special=True parses control tokens such as <|im_start|>
        written in the text; special=False tokenizes them as plain text (user-defined tokens are
        always recognised, as in llama.cpp)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", "surrogateescape")
        elif not isinstance(text, str):
            raise TokenizerError(f"{self.source}: encode() takes str or bytes, not {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos requested but the vocabulary has no BOS token")
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, special) if text else ():
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                out += self._encode_text(frag, prev_special)
                prev_special = False
        if add_eos:
            if self._end_id is None:
                raise TokenizerError(f"{self.source}: add_eos requested but the vocabulary has no EOS token")
            out.append(self._end_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """Split special tokens out of the text: a list of str (plain text) and int (token id)."""
        index = self._special_index
        if not index:
            return [text]
        grams = {text[i:i + 3] for i in range(len(text))}   # every 3-gram, and the 1-/2-gram tails
        grams.update(text, {text[i:i + 2] for i in range(len(text))})
        order = sorted(pos for g in grams.intersection(index) for pos in index[g])
        frags = [text]
        for tok, tid, attr in map(self._special_order.__getitem__, order):
            if (not parse_special and attr & _SKIPPABLE) or tok not in text:
                continue
            new = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        new.append(tid)
                    if part:
                        new.append(part)
            frags = new
        return frags

    def _bpe_encode(self, text: str, _prev_special=False) -> list[int]:
        return self._hf.encode(_replace_invalid(text), add_special_tokens=False).ids

    def _gemma4_encode(self, text: str, _prev_special=False) -> list[int]:
        """llama.cpp's gemma4 BPE: spaces escaped, the text cut into runs of newlines and runs of other
        characters, each run merged on its own; a run of newlines that is a token is that token."""
        text = _replace_invalid(text).replace(" ", "\u2581")
        hf = self._hf
        if "\n" not in text:
            return hf.encode(text, add_special_tokens=False).ids
        out = []
        for run in _NEWLINE_RUNS.findall(text):
            tid = hf.token_to_id(run) if run[0] == "\n" else None
            if tid is not None:
                out.append(tid)
            else:
                out += hf.encode(run, add_special_tokens=False).ids
        return out

    def _wpm_encode(self, text: str, _prev_special=False) -> list[int]:
        """llama.cpp's WPM: BERT-normalised words (see _wpm_words), each "\u2581" + word cut greedily into
        the longest tokens from the left; a word that cannot be cut completely is the unknown token."""
        ids, longest, unk, out = self._ids, self._max_len, self.unk_id, []
        for word in _wpm_words(text, self._lowercase, self._strip_accents):
            word = "\u2581" + word
            n, start, i = len(word), len(out), 0
            while i < n:
                for j in range(min(n, i + longest), i, -1):
                    tid = ids.get(word[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:
                    del out[start:]
                    break
            if len(out) == start and unk is not None:
                out.append(unk)
        return out

    def _spm_encode(self, text: str, prev_special: bool) -> list[int]:
        if self.add_space_prefix and prev_special:
            text = " " + text
        text = text.replace(" ", "\u2581")
        if _is_clean(text):
            syms, ids = list(text), self._ids
        else:   # invalid UTF-8: work on bytes, one symbol per (claimed) UTF-8 sequence, like llama.cpp
            data = _to_bytes(text)
            syms, i = [], 0
            while i < len(data):
                k = _UTF8_LEN[data[i] >> 4]
                syms.append(data[i:i + k])
                i += k
            ids = _Utf8Keys(self._ids)
        out = []
        for sym in _spm_merge(syms, ids, self._scores):
            tid = ids.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            for b in (sym if isinstance(sym, bytes) else sym.encode()):
                tid = self._byte_ids[b]
                if tid is None:
                    if self.unk_id is None:
                        raise TokenizerError(f"{self.source}: no byte token for 0x{b:02X} and no unknown token")
                    tid = self.unk_id
                out.append(tid)
        return out

    # --- decode -------------------------------------------------------------------------------------
    def _check(self, tid) -> int:
        try:
            i = operator.index(tid)
        except TypeError:
            raise TokenizerError(f"{self.source}: token id {tid!r} is not an integer") from None
        if not 0 <= i < self.n_vocab:
            raise TokenizerError(f"{self.source}: token id {i} is out of range (vocabulary size {self.n_vocab})")
        return i

    def token_to_bytes(self, tid) -> bytes:
        """The bytes token `tid` stands for (special tokens as their text)."""
        i = self._check(tid)
        p = self._pieces[i]
        if p is None:
            p = self._pieces[i] = self._piece(i)
        return p

    def _piece(self, i: int) -> bytes:
        text, attr = self._tokens[i], int(self._attr[i])
        if attr & (_SKIPPABLE | USER_DEFINED):
            return text.encode()
        if attr & NORMAL:
            if self._escaped:
                return text.replace("\u2581", " ").encode()
            out = bytearray()
            for c in text:
                b = _BYTE_DEC.get(c)
                if b is None:   # not a byte-level character: llama.cpp's marker
                    out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if attr & BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                raise TokenizerError(f"{self.source}: byte token {i} has bad text {text!r}") from None
        return b""

    def is_special(self, tid) -> bool:
        """True for control and unknown tokens: those decode(skip_special=True) leaves out."""
        return bool(self._attr[self._check(tid)] & _SKIPPABLE)

    def _decode_pieces(self, ids, skip_special: bool):
        ids = [self._check(t) for t in ids]
        strip = self.add_space_prefix
        if skip_special and ids:    # llama.cpp's llama_detokenize(remove_special=true)
            if self.add_bos and ids[0] == self.bos_id:
                strip, ids = False, ids[1:]
            if self.add_eos and ids and ids[-1] == self.eos_id:
                ids = ids[:-1]
        pieces = [b"" if skip_special and self._attr[i] & _SKIPPABLE else self.token_to_bytes(i) for i in ids]
        if strip and pieces and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        return pieces

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(self._decode_pieces(ids, skip_special)).decode("utf-8", "replace")

    def __repr__(self):
        return f"Tokenizer({self.source!r}, model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"


def _spm_merge(syms: list, ids: dict, scores: list) -> list:
    """llama.cpp's SPM merge: repeatedly join the adjacent pair whose joined text is the token with the
    highest score (leftmost on ties) until no adjacent pair forms a token. Works on str or bytes."""
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        t = ids.get(syms[i] + syms[i + 1])
        if t is not None:
            heap.append((-scores[t], i, i + 1, len(syms[i]) + len(syms[i + 1])))
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop
    while heap:
        _, left, right, size = pop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or len(a) + len(b) != size:
            continue        # stale: one side has changed since this pair was queued
        syms[left], syms[right] = a + b, a[:0]
        r = nxt[right]
        nxt[left] = r
        if r >= 0:
            prv[r] = left
            t = ids.get(syms[left] + syms[r])
            if t is not None:
                push(heap, (-scores[t], left, r, len(syms[left]) + len(syms[r])))
        p = prv[left]
        if p >= 0:
            t = ids.get(syms[p] + syms[left])
            if t is not None:
                push(heap, (-scores[t], p, left, len(syms[p]) + len(syms[left])))
    out, i = [], 0
    while i != -1:
        out.append(syms[i])
        i = nxt[i]
    return out


class _Utf8Keys:
    """Looks bytes up in the str-keyed vocabulary (bytes that are not UTF-8 are no token)."""
    __slots__ = ("ids",)

    def __init__(self, ids):
        self.ids = ids

    def get(self, key: bytes):
        try:
            return self.ids.get(key.decode())
        except UnicodeDecodeError:
            return None


# WPM's text classes (llama.cpp's unicode tables: Unicode White_Space; categories C* but Cn are control)
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(map(chr, range(0x2000, 0x200B))))
_CONTROL_CATS = frozenset(("Cc", "Cf", "Co", "Cs"))
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))     # as llama.cpp (and HF's BERT) list them


def _wpm_words(text: str, lowercase: bool, strip_accents: bool) -> list[str]:
    """BERT pre-tokenisation as llama.cpp does it: each code point replaced by the first of its NFD form
    (when stripping accents), split at whitespace; control characters, NUL, U+FFFD (invalid UTF-8) and
    (when stripping) marks dropped; punctuation, ASCII symbols and CJK ideographs each a word of their own;
    simple lowercase mapping (one code point to one)."""
    from unicodedata import category, normalize
    words, cur = [], []
    for c in text:
        if strip_accents and c > "\x7f":
            c = normalize("NFD", c)[0]
        if c in _WHITESPACE:
            if cur:
                words.append("".join(cur))
                cur = []
            continue
        cat, cp = category(c), ord(c)       # escaped invalid bytes are surrogates (Cs): dropped
        if cp == 0 or cp == 0xFFFD or cat in _CONTROL_CATS or strip_accents and cat[0] == "M":
            continue
        if lowercase:
            c = c.lower()[0]
        if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or any(lo <= cp <= hi for lo, hi in _CJK):
            if cur:
                words.append("".join(cur))
                cur = []
            words.append(c)
        else:
            cur.append(c)
    if cur:
        words.append("".join(cur))
    return words


def _is_clean(text: str) -> bool:
    """True when `text` has no lone surrogates (escaped invalid bytes)."""
    if text.isascii():
        return True
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _replace_invalid(text: str) -> str:
    """`text` with each escaped invalid byte as U+FFFD, as llama.cpp reads them for BPE."""
    if _is_clean(text):
        return text
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _to_bytes(text: str) -> bytes:
    """UTF-8 bytes of `text`, escaped bytes (U+DC80..U+DCFF) restored; other lone surrogates -> U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff" else c
                       for c in text)
        return text.encode("utf-8", "surrogateescape")


class StreamingDetokenizer:
    """Turns ids into text one at a time: `add(id)` returns the text completed by that token and holds
    back the bytes of a character that is not complete yet; `flush()` returns what is left (an
    incomplete character as U+FFFD). The concatenated output equals `tokenizer.decode(ids)` (for
    vocabularies with add_space_prefix, decode also drops one leading space; the stream, which usually
    continues a prompt, does not)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, tid) -> str:
        tok = self.tokenizer
        piece = tok.token_to_bytes(tid)
        if self.skip_special and tok._attr[operator.index(tid)] & _SKIPPABLE:
            return ""
        return self._dec.decode(piece, False)

    def flush(self) -> str:
        text = self._dec.decode(b"", True)
        self._dec.reset()
        return text
