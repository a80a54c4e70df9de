"""Tokenizer metadata for GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes it.

SentencePiece (tokenizer.model, read with the `sentencepiece` library):
  tokenizer.ggml.model = "llama", pre = "default", tokens (piece bytes), scores, token_type
  (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte); ids past the model's size up
  to config.vocab_size are "[PAD{i}]" / score -1000 / unused; added_tokens.json and
  tokenizer_config.json's added_tokens_decoder override entries (score -1000, control or user defined).
BPE (tokenizer.json, read with the `tokenizers` library):
  tokenizer.ggml.model = "gpt2", pre = the pre-tokenizer name llama.cpp uses (see `bpe_pre`), tokens,
  token_type, merges ("a b"; a space inside a part becomes U+0120+... as gguf-py encodes it).
Then, for both (gguf-py's SpecialVocab rules): special token ids from tokenizer_config.json's
*_token strings looked up among tokenizer.json's added tokens, then config.json's *_token_id, then
(our addition, used only when both are silent) generation_config.json; add_bos/add_eos/add_sep from
tokenizer.json's post-processor, else tokenizer_config.json's add_*_token; the chat template from
tokenizer_config.json, else chat_template.jinja, else chat_template.json; normalizer flags.
"""
from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from infer.errors import ConvertError, UnsupportedError

log = logging.getLogger("infer.convert")

# token types (llama.h / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The text llama.cpp's converter tokenizes to identify a BPE pre-tokenizer: sha256 of str(ids).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
          '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# hashes of the vocabularies we meet (values from llama.cpp's table)
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",    # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",       # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",        # Qwen1.5 / Qwen2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",        # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",        # gpt2
}

# pre-tokenizer regexes as they appear in tokenizer.json
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
           "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
           "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id",
           "eot": "tokenizer.ggml.eot_token_id", "eom": "tokenizer.ggml.eom_token_id"}   # no key for cls
ADD_KEYS = {"bos": "tokenizer.ggml.add_bos_token", "eos": "tokenizer.ggml.add_eos_token",
            "sep": "tokenizer.ggml.add_sep_token"}


def load_json(path: Path, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None


def looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens that ought to be control tokens."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------
def spm_vocab(folder: Path, vocab_size: int | None):
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with a multi-line text
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    n_sp = sp.vocab_size()
    n = vocab_size or n_sp
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(min(n_sp, n)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else
                    UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    if n_sp > n:
        log.warning("tokenizer.model has %d pieces, more than vocab_size %d: ignoring the rest", n_sp, n)
    added = load_json(folder / "added_tokens.json")
    if isinstance(added, dict):
        for text, tid in added.items():
            if isinstance(tid, int) and 0 <= tid < n:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED
    tc = load_json(folder / "tokenizer_config.json") or {}
    decoder = tc.get("added_tokens_decoder") if isinstance(tc, dict) else None
    if isinstance(decoder, dict):
        for sid, data in decoder.items():
            try:
                tid = int(sid)
            except ValueError:
                continue
            if not (0 <= tid < n) or not isinstance(data, dict) or not isinstance(data.get("content"), str):
                continue
            text = data["content"]
            if data.get("special") or looks_special(text):
                types[tid] = CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[tid] = USER_DEFINED
            scores[tid] = -1000.0
            tokens[tid] = text.encode("utf-8")
    return tokens, scores, types


# ---------------------------------------------------------------------------------------------
# BPE (tokenizer.json)
# ---------------------------------------------------------------------------------------------
def _pretokenizers(tj: dict) -> list[dict]:
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "Sequence":
        return [p for p in pt.get("pretokenizers", []) if isinstance(p, dict)]
    return [pt] if pt else []


def pre_by_structure(tj: dict) -> str | None:
    """The llama.cpp pre-tokenizer name from the shape of tokenizer.json's pre_tokenizer, or None."""
    pts = _pretokenizers(tj)
    kinds = [p.get("type") for p in pts]
    if kinds == ["Digits", "ByteLevel"] and pts[0].get("individual_digits") and pts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and pts[0].get("use_regex", True):
        return "gpt-2"
    if kinds and kinds[0] == "Split" and all(k == "ByteLevel" for k in kinds[1:]):
        pattern = (pts[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_REGEX:
            return "llama-bpe"
        if pattern == QWEN2_REGEX:
            return "qwen2"
    return None


def bpe_pre(tok, tj: dict, path: Path) -> str:
    """tokenizer.ggml.pre as llama.cpp picks it: by the hash of the ids of CHKTXT (special tokens
    included); for a vocabulary outside our table, by the pre-tokenizer's structure; else "default"."""
    h = sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    if h in KNOWN_PRE:
        return KNOWN_PRE[h]
    pre = pre_by_structure(tj)
    if pre is not None:
        return pre
    log.warning("%s: BPE pre-tokenizer not recognized (chkhsh %s); writing tokenizer.ggml.pre = default", path, h)
    return "default"


def bpe_vocab(folder: Path, vocab_size: int | None):
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    tj = load_json(path, required=True)
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise ConvertError(f"{path}: no \"model\" object")
    if tj["model"].get("type") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {tj['model'].get('type')!r} is not supported (BPE only)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: cannot be loaded by tokenizers ({str(e).splitlines()[0] if str(e) else e!r})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    n = vocab_size or len(vocab)
    if vocab and max(vocab.values()) >= n:
        raise ConvertError(f"{path}: token id {max(vocab.values())} is not below config.json's vocab_size {n}")
    pre = bpe_pre(tok, tj, path)
    reverse = {i: t for t, i in vocab.items()}
    added = {a["content"]: a for a in tj.get("added_tokens", []) if isinstance(a, dict) and "content" in a}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if t in added:
            if added[t].get("special") or looks_special(t):
                types.append(CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(t)
    return tokens, types, pre


def _merges(tj: dict, path: Path) -> list[str]:
    merges = (tj.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return merges
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    raise ConvertError(f"{path}: unknown merges format")


def _merges_txt(folder: Path) -> list[str]:
    p = folder / "merges.txt"
    if not p.is_file():
        return []
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    for line in lines:
        parts = line.strip().split(None, 3)
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out


# ---------------------------------------------------------------------------------------------
# special tokens, add_*_token, chat template (gguf-py SpecialVocab's rules)
# ---------------------------------------------------------------------------------------------
class SpecialTokens:
    def __init__(self, folder: Path, load_merges: bool, n_vocab: int | None):
        self.folder, self.n_vocab = folder, n_vocab
        self.types = list(SPECIAL_TYPES)
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.merges: list[str] = []
        self.chat_template = None
        self.lowercase = self.strip_accents = None
        self._from_tokenizer_files(load_merges)
        self._from_config(load_json(folder / "config.json") or {})
        gc = load_json(folder / "generation_config.json")
        if isinstance(gc, dict):
            for typ in ("bos", "eos"):
                v = gc.get(f"{typ}_token_id")
                if isinstance(v, list) and v:
                    v = v[0]
                if typ not in self.ids:
                    self._set(typ, v)
        if load_merges and not self.merges:
            self.merges = _merges_txt(folder)
            if not self.merges:
                log.warning("%s: no BPE merges found; the vocabulary may not work", folder)

    def _set(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool) or typ in self.ids:
            return
        if tid < 0:
            raise ConvertError(f"{self.folder}: invalid {typ} token id {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.ids[typ] = tid
        else:
            log.warning("special token %s id %d is not below the vocabulary size %d: skipped", typ, tid, self.n_vocab)

    def _from_config(self, cfg: dict) -> None:
        for typ in self.types:
            tid = cfg.get(f"{typ}_token_id")
            if tid is None and isinstance(cfg.get("text_config"), dict):
                tid = cfg["text_config"].get(f"{typ}_token_id")
            self._set(typ, tid)

    def _parse_normalizer(self, norm: dict) -> None:
        t = norm.get("type")
        if t == "Lowercase":
            self.lowercase = True
        elif t == "StripAccents":
            self.strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in norm:
                self.lowercase = norm["lowercase"]
            if "strip_accents" in norm:
                self.strip_accents = norm["strip_accents"]
        elif t == "Sequence":
            for n in norm.get("normalizers", []):
                if isinstance(n, dict):
                    self._parse_normalizer(n)

    def _from_tokenizer_files(self, load_merges: bool) -> None:
        folder = self.folder
        tj = load_json(folder / "tokenizer.json")
        tc = load_json(folder / "tokenizer_config.json")
        if tc is not None and not isinstance(tc, dict):
            raise ConvertError(f"{folder / 'tokenizer_config.json'}: not a JSON object")
        added_tokens: list = []
        if isinstance(tj, dict):
            if load_merges:
                self.merges = _merges(tj, folder / "tokenizer.json")
            if isinstance(tj.get("normalizer"), dict):
                self._parse_normalizer(tj["normalizer"])
            added_tokens = [a for a in tj.get("added_tokens", []) if isinstance(a, dict)]
            self._post_processor(tj, tc)
        if not tc:
            tpl = folder / "chat_template.jinja"          # our addition: a template without tokenizer_config
            if tpl.is_file():
                self.chat_template = tpl.read_text(encoding="utf-8")
            return
        alt = None
        tpl_jinja, tpl_json = folder / "chat_template.jinja", folder / "chat_template.json"
        if tpl_jinja.is_file():
            alt = tpl_jinja.read_text(encoding="utf-8")
            extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif tpl_json.is_file():
            j = load_json(tpl_json)
            alt = j.get("chat_template") if isinstance(j, dict) else None
        tpl = tc.get("chat_template", alt)
        if tpl is None or isinstance(tpl, (str, list)):
            self.chat_template = tpl
        else:
            log.warning("tokenizer_config.json: chat_template of type %s ignored", type(tpl).__name__)
        for typ in self.types:
            add = tc.get(f"add_{typ}_token")
            if isinstance(add, bool) and typ not in self.add:
                self.add[typ] = add
            entry = tc.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added_tokens if a.get("content") == entry), None)
            self._set(typ, tid)

    def _post_processor(self, tj: dict, tc: dict | None) -> None:
        """add_bos/add_eos/add_sep from tokenizer.json's post-processor (gguf-py's crude parse)."""
        pp = tj.get("post_processor")
        if not isinstance(pp, dict):
            return
        cfg = tc if tc else None
        bos = (tc or {}).get("bos_token")
        cls = (tc or {}).get("cls_token")
        eos = (tc or {}).get("eos_token")
        sep = (tc or {}).get("sep_token")
        if not bos and cls and cfg:
            cfg["bos_token"] = bos = cls
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        for proc in pp.get("processors", [pp]):
            kind = proc.get("type") if isinstance(proc, dict) else None
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not cls and cfg:
                    cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and cfg:
                    cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single, pair = proc.get("single", []), proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    first = (single[0].get("SpecialToken") or {}).get("id")
                    if first:
                        if not cfg:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                cfg["bos_token"] = bos = first
                            if not cls:
                                cfg["cls_token"] = cls = first
                        self.add["bos"] = first in (bos, cls)
                    last = (single[-1].get("SpecialToken") or {}).get("id")
                    if last:
                        if not cfg:
                            eos = last
                        elif last != eos:
                            if "eot" not in self.types:
                                self.types.append("eot")
                                cfg["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types.append("eom")
                                cfg["eom_token"] = eos
                            cfg["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and (pair[0].get("SpecialToken") or {}).get("id") == first else 0
                    stop = -1 if last and (pair[-1].get("SpecialToken") or {}).get("id") == last else None
                    mid = pair[slice(start, stop)]
                    if mid:
                        a = (mid[0].get("Sequence") or {}).get("id")
                        b = (mid[-1].get("Sequence") or {}).get("id")
                        if a == "A" and b == "B" and (mid := mid[1:-1]):
                            add_sep = False
                            entry = (mid[0].get("SpecialToken") or {}).get("id")
                            if entry and entry in (sep, eos) and not last:
                                add_sep = True
                            if len(mid) == 2:
                                entry2 = (mid[1].get("SpecialToken") or {}).get("id")
                                if entry2 and entry2 in (sep, eos):
                                    add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and cfg:
                                cfg["sep_token"] = eos

    def write(self, w) -> None:
        if self.merges:
            w.add_array("tokenizer.ggml.merges", self.merges)
        for typ, tid in self.ids.items():
            if typ in ID_KEYS:
                w.add_uint32(ID_KEYS[typ], tid)
        for typ, value in self.add.items():
            if typ in ADD_KEYS:
                w.add_bool(ADD_KEYS[typ], value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            w.add_bool("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)


def _spm_style_json(tj: dict) -> bool:
    m = tj.get("model") or {}
    dec = tj.get("decoder") or {}
    return m.get("type") == "BPE" and bool(m.get("byte_fallback")) and dec.get("type") == "Sequence"


def write_vocab(w, folder: Path, gguf_arch: str, vocab_size: int | None) -> str:
    """Add the tokenizer keys to metadata recorder `w`; returns a one-line description."""
    tc = load_json(folder / "tokenizer_config.json")
    llama = gguf_arch in ("llama", "smollm3")          # llama.cpp's LlamaModel.set_vocab
    if llama and isinstance(tc, dict) and tc.get("add_prefix_space") is not None:
        w.add_bool("tokenizer.ggml.add_space_prefix", bool(tc["add_prefix_space"]))
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = spm_vocab(folder, vocab_size)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", types)
        SpecialTokens(folder, load_merges=False, n_vocab=len(tokens)).write(w)
        if gguf_arch == "gemma3":
            w.add_bool("tokenizer.ggml.add_space_prefix", False)     # as llama.cpp's Gemma3Model writes
        desc = f"SentencePiece, {len(tokens)} tokens"
    elif (folder / "tokenizer.json").is_file():
        tj = load_json(folder / "tokenizer.json", required=True)
        if llama and isinstance(tj, dict) and _spm_style_json(tj):
            raise UnsupportedError(f"{folder / 'tokenizer.json'}: a SentencePiece-style BPE (byte fallback) without "
                                   f"tokenizer.model is not supported; add the model's tokenizer.model")
        tokens, types, pre = bpe_vocab(folder, vocab_size)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        SpecialTokens(folder, load_merges=True, n_vocab=None).write(w)
        desc = f"BPE ({pre}), {len(tokens)} tokens"
    else:
        raise ConvertError(f"{folder}: missing tokenizer (no tokenizer.model or tokenizer.json)")
    if llama and vocab_size == 49152:
        w.add_bool("tokenizer.ggml.add_bos_token", False)   # llama.cpp does this for every 49152-token llama
    return desc
