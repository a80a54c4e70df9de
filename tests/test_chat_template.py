"""Chat templates: the model's own template renders as Hugging Face's would (and as llama.cpp's
engine does: tests/golden/chat_templates_llamacpp.json); hostile templates fail cleanly, fast, and
without side effects; a file without a template gets its family's format.

The templates llama.cpp ships (models/templates/, 70 of them) are rendered when a llama.cpp tree
is at hand: INFER_LLAMACPP_SRC, or /work/llamacpp/src, or /work/llamacpp/sdist/vendor/llama.cpp.
A few of them, and small templates that each need one feature, are in tests/data/chat_templates/.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from infer.chat_template import FORMATS, ChatTemplate, fallback_format
from infer.errors import TemplateError
from infer.gguf_file import GGUFFile

HERE = Path(__file__).parent
DATA = HERE / "data" / "chat_templates"
GOLDEN = json.loads((HERE / "golden" / "chat_templates_llamacpp.json").read_text())
sys.path.insert(0, str(HERE / "golden"))
from make_chat_template_goldens import undate  # noqa: E402

MSGS = [{"role": "user", "content": "Hi <|im_start|> there"}]
CONVERSATIONS = GOLDEN["conversations"]     # "system": system, user, assistant, user; "plain": no system
# renders where llama.cpp's engine and Python's jinja2 (what transformers runs) differ on purpose
LLAMACPP_DIFFERS = {
    ("meetkai-functionary-medium-v3.1.jinja", "tools"):
        "'...'|safe + text: jinja2's Markup escapes the text (&lt; &#34;), llama.cpp's engine does not",
}


def llamacpp_templates_dir() -> tuple[Path | None, str]:
    env = os.environ.get("INFER_LLAMACPP_SRC")
    roots = [Path(env)] if env else [Path("/work/llamacpp/src"), Path("/work/llamacpp/sdist/vendor/llama.cpp")]
    for root in roots:
        if (root / "models" / "templates").is_dir():
            return root / "models" / "templates", ""
    where = f"INFER_LLAMACPP_SRC={env}" if env else "INFER_LLAMACPP_SRC is not set and " + " / ".join(map(str, roots))
    return None, f"no llama.cpp tree with models/templates/ ({where} has none)"


def template_params(folder: Path | None, reason: str = ""):
    if folder is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-llama.cpp")]
    return [pytest.param(p, id=p.name) for p in sorted(folder.glob("*.jinja"))]


def check_conversation(tpl: ChatTemplate, messages, **extra) -> str:
    """A plain conversation renders with every message's text verbatim, the turns in order (the
    system text may go anywhere: Mistral's templates put it in the last user turn), and ends in
    the assistant's prompt: markup after the last message, and add_generation_prompt changes the
    output wherever the template reads it."""
    text = tpl.render(messages, add_generation_prompt=True, **extra)
    for m in messages:
        assert m["content"] in text, f"{m['role']} message missing in {text!r}"
    pos = 0
    for m in messages:
        if m["role"] != "system":
            i = text.find(m["content"], pos)
            assert i >= 0, f"{m['role']} message out of order in {text!r}"
            pos = i + len(m["content"])
    assert text[pos:], "nothing after the last message"
    if "add_generation_prompt" in tpl.source:
        assert tpl.render(messages, add_generation_prompt=False, **extra) != text
    return text


def check_golden(path: Path, tpl: ChatTemplate):
    """The output is llama.cpp's (same variables, today's date masked), for a template whose text
    is the one the golden was made from."""
    want = GOLDEN["renders"].get(path.name)
    if want is None or want["sha256"] != hashlib.sha256(path.read_text().encode()).hexdigest():
        return False
    tpl = ChatTemplate(tpl.source, GOLDEN["bos_token"], GOLDEN["eos_token"], origin=path.name)
    for conv, expected in want.items():
        if conv == "sha256" or (path.name, conv) in LLAMACPP_DIFFERS:
            continue
        extra = dict(GOLDEN["variables"])
        if conv == "tools":
            messages, extra["tools"] = CONVERSATIONS["plain"][-1:], GOLDEN["tools"]
        else:
            messages = CONVERSATIONS[conv]
        assert not isinstance(expected, dict), f"llama.cpp failed on {path.name} ({conv}): {expected}"
        got = undate(tpl.render(messages, **extra), datetime.date.today())
        assert got == expected, f"{path.name} ({conv}) differs from llama.cpp's rendering"
    return True


def check_template_file(path: Path):
    tpl = ChatTemplate(path.read_text(), "<s>", "</s>", origin=path.name)
    for conv in ("system", "plain"):
        check_conversation(tpl, CONVERSATIONS[conv])
    return check_golden(path, tpl)


LLAMACPP_DIR, LLAMACPP_REASON = llamacpp_templates_dir()


@pytest.mark.parametrize("path", template_params(LLAMACPP_DIR, LLAMACPP_REASON))
def test_llamacpp_templates_render(path):
    check_template_file(path)


@pytest.mark.parametrize("path", template_params(DATA))
def test_template_copies_render_as_llamacpp(path):
    assert check_template_file(path), f"{path.name} has no golden: run tests/golden/make_chat_template_goldens.py"


def test_llamacpp_templates_all_there():
    if LLAMACPP_DIR is None:
        pytest.skip(LLAMACPP_REASON)
    assert len(list(LLAMACPP_DIR.glob("*.jinja"))) >= 70


def test_smollm2_template(smollm2_path):
    with GGUFFile(smollm2_path) as gf:
        tpl = ChatTemplate(gf.metadata["tokenizer.chat_template"], origin=str(smollm2_path))
    text = tpl.render(MSGS)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi <|im_start|> there<|im_end|>\n<|im_start|>assistant\n")


# --- the features, one template each -------------------------------------------------------------
def data(name, **kw) -> ChatTemplate:
    return ChatTemplate((DATA / name).read_text(), origin=name, **kw)


SYS_CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def test_loop_controls():
    assert data("infer-loop-controls.jinja").render(SYS_CONV) == (
        "<|turn|>system\nBe brief.<|end|>\n<|turn|>user\nHi<|end|>\n<|turn|>assistant\nHello.<|end|>\n"
        "<|turn|>user\n2+2?<|end|>\n<|turn|>assistant\n")


def test_generation_block_renders_its_body():
    assert data("infer-generation-tag.jinja").render(SYS_CONV[1:], add_generation_prompt=False) == (
        "<|turn|>user\nHi<|end|>\n<|turn|>assistant\nHello.<|end|>\n<|turn|>user\n2+2?<|end|>\n")


def test_system_message_folded_when_the_template_refuses_it(caplog):
    tpl = data("infer-no-system-role.jinja", bos_token="<bos>")
    with pytest.raises(TemplateError, match="System role not supported"):
        tpl._render(SYS_CONV, True, {})
    assert not tpl.supports_system_role
    assert tpl.render(SYS_CONV) == (   # as llama.cpp: the system text and "\n" open the first user turn
        "<bos><|turn|>user\nBe brief.\nHi<|end|>\n<|turn|>assistant\nHello.<|end|>\n<|turn|>user\n2+2?<|end|>\n"
        "<|turn|>assistant\n")
    lone = ChatTemplate("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no') }}{% endif %}"
                        "{{ m.content }}{% endfor %}A:", origin="nosys")
    with caplog.at_level("WARNING", logger="infer"):    # as llama.cpp: a lone system message goes
        assert lone.render(SYS_CONV[:1]) == "A:"
    assert "nosys: the chat template takes no system message; a lone one is left out" in caplog.text
    with pytest.raises(TemplateError, match="roles must alternate"):
        tpl.render(SYS_CONV[1:3] * 2 + SYS_CONV[3:] * 2)
    assert data("infer-loop-controls.jinja").supports_system_role


def test_system_folding_keeps_message_order_for_chat_tokens():
    # LLM.chat_tokens renders markers in place of the texts and needs each one verbatim, in order
    marks = [{**m, "content": f"\x00mark{i}\x00"} for i, m in enumerate(SYS_CONV)]
    text = data("infer-no-system-role.jinja").render(marks)
    assert [text.find(m["content"]) for m in marks] == sorted(text.find(m["content"]) for m in marks)
    assert all(m["content"] in text for m in marks)


def test_bos_written_by_the_template_is_dropped_when_the_tokenizer_adds_one():
    # Gemma's and Llama 3's templates start with {{ bos_token }}; the tokenizer adds BOS too (llama.cpp
    # strips the template's, else the prompt starts with two)
    src = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ChatTemplate(src, "<bos>", add_bos=True).render(MSGS) == "Hi <|im_start|> there"
    assert ChatTemplate(src, "<bos>").render(MSGS) == "<bos>Hi <|im_start|> there"
    md = {"tokenizer.chat_template": src, "tokenizer.ggml.add_bos_token": True}
    assert ChatTemplate.from_metadata(md, "<bos>").render(MSGS) == "Hi <|im_start|> there"
    assert ChatTemplate.from_metadata(md, "<bos>", add_bos=False).render(MSGS).startswith("<bos>")


def test_final_newline_dropped_as_transformers_does():
    assert ChatTemplate("{{ messages[0].content }}\n").render(MSGS) == MSGS[0]["content"]


def test_dates():
    today = datetime.date.today()
    tpl = data("infer-dates.jinja")
    assert tpl.render(MSGS).startswith(f"<|turn|>system\nToday: {today:%Y-%m-%d} ({today:%d %b %Y})<|end|>\n")
    assert "(26 Jul 2024)" in tpl.render(MSGS, date_string="26 Jul 2024")


def test_tools_undefined_and_tojson():
    tpl = data("infer-tools-tojson.jinja")
    assert tpl.render(MSGS, add_generation_prompt=False) == (
        "<|turn|>system\nTools:<|end|>\n<|turn|>user\nHi <|im_start|> there<|end|>\n")
    tools = [{"name": "f", "description": "a <b> & 'c' ü", "parameters": {"z": 1, "a": [True, None]}}]
    text = tpl.render(MSGS, tools=tools, documents=[{"title": "T"}])
    assert text.startswith('<|turn|>system\nTools:\n{\n  "name": "f",\n  "description": "a <b> & \'c\' ü",\n'
                           '  "parameters": {\n    "z": 1,\n    "a": [\n      true,\n      null\n    ]\n  }\n}'
                           '\nDocuments: [{"title": "T"}]<|end|>\n')
    gen = ChatTemplate("{{ tools | map(attribute='name') | tojson }}").render(MSGS, tools=tools)
    assert gen == '["f"]'      # a filter's generator serialises as a list, as in llama.cpp


def test_undefined_and_none_concatenate_as_empty():
    text = data("infer-undefined-concat.jinja").render(MSGS)
    assert text.startswith(f"<|turn|>system\nFunctions:\nToday is {datetime.date.today():%b %d %Y}.<|end|>\n")
    assert ChatTemplate("{{ 'a' + none + 'b' + nothing }}").render(MSGS) == "ab"
    with pytest.raises(TemplateError, match="UndefinedError"):
        ChatTemplate("{{ nothing + 1 }}").render(MSGS)


def test_error_messages_are_one_line():
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{{ raise_exception('line one\nline two') }}", origin="m.gguf").render(MSGS)
    assert str(e.value) == "m.gguf: chat template raised: line one line two"
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{% for %}\n\n{% endfor %}", origin="m.gguf")
    assert "\n" not in str(e.value) and str(e.value).startswith("m.gguf: chat template does not parse")


# --- hostile templates ---------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [
    "{{ lipsum.__globals__['os'].system('touch /tmp/infer-pwned') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'x' * 10**8 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
    "{{ messages.append(1) }}",
    "{% if %}",
    "{{ raise_exception('no system role allowed') }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% for m in messages %}{% generation %}{{ m.__class__.__subclasses__() }}{% endgeneration %}{% endfor %}",
    "{% for i in range(10) %}{% break %}{% endfor %}{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ strftime_now.__globals__['os'].system('touch /tmp/infer-pwned') }}",
])
def test_hostile_templates_fail_cleanly(payload, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(TemplateError):
        ChatTemplate(payload, origin="evil.gguf").render(MSGS)
    assert time.perf_counter() - t0 < 5
    assert not os.path.exists("/tmp/infer-pwned")


# --- files without a template --------------------------------------------------------------------
def test_missing_template_falls_back_with_warning(caplog):
    with caplog.at_level("WARNING", logger="infer"):
        tpl = ChatTemplate(None, origin="plain.gguf")
    assert "no chat template" in caplog.text and "chatml" in caplog.text
    assert tpl.render(MSGS) == "<|im_start|>user\nHi <|im_start|> there<|im_end|>\n<|im_start|>assistant\n"


LLAMA3_VOCAB = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "a"]
LLAMA2_VOCAB = ["<unk>", "<s>", "</s>", "▁a"]


@pytest.mark.parametrize("arch, vocab, expected", [
    ("gemma3", [], "gemma"), ("gemma2", [], "gemma"), ("gemma", [], "gemma"),
    ("qwen2", [], "chatml"), ("qwen3", [], "chatml"), ("phi3", [], "phi3"),
    ("llama", LLAMA3_VOCAB, "llama3"), ("llama", LLAMA2_VOCAB, "llama2"),
    ("llama", ["<|im_start|>", "<|im_end|>", "a"], "chatml"),          # SmolLM2: ChatML on llama
    ("llama", LLAMA3_VOCAB + ["<|im_start|>", "<|im_end|>"], "chatml"),  # a ChatML fine-tune of Llama 3
    ("llama", ["[INST]", "[/INST]", "a"], "mistral"), ("mistral", LLAMA2_VOCAB, "mistral"),
    ("somethingnew", ["<start_of_turn>", "<end_of_turn>"], "gemma"), ("somethingnew", [], "chatml"),
    (None, (), "chatml"),
])
def test_fallback_format_by_architecture_and_vocabulary(arch, vocab, expected):
    assert fallback_format(arch, vocab) == expected


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fallback_formats_render_a_conversation(name):
    tpl = ChatTemplate(FORMATS[name], "<s>", "</s>", origin=name)
    assert tpl.supports_system_role       # each format places the system text itself
    for conv in ("system", "plain"):
        check_conversation(tpl, CONVERSATIONS[conv])


def test_fallback_formats_exactly():
    conv = CONVERSATIONS["system"]
    render = lambda name: ChatTemplate(FORMATS[name], "<s>", "</s>").render(conv)  # noqa: E731
    assert render("gemma") == (
        "<start_of_turn>user\nYou are terse.\n\nHello there<end_of_turn>\n<start_of_turn>model\nHi! How can I help?"
        "<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert render("llama3") == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("llama2") == (
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello there [/INST] Hi! How can I help? </s>"
        "<s>[INST] What is 2+2? [/INST]")
    assert render("mistral") == ("[INST] You are terse.\n\nHello there[/INST] Hi! How can I help?</s>"
                                 "[INST] What is 2+2?[/INST]")
    assert render("phi3") == ("<|system|>\nYou are terse.<|end|>\n<|user|>\nHello there<|end|>\n<|assistant|>\n"
                              "Hi! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n")


def test_smollm2_without_its_template_gets_chatml(smollm2_path):
    with GGUFFile(smollm2_path) as gf:
        md = {**gf.metadata, "tokenizer.chat_template": None}
        assert ChatTemplate.from_metadata(md, origin="smollm2").format == "chatml"


def gemma3_270m_path() -> Path:
    from conftest import gemma3_file
    return gemma3_file()


def test_gemma3_270m_without_a_template_gets_gemma_turns(caplog):
    path = gemma3_270m_path()
    with GGUFFile(path) as gf:
        md = gf.metadata
        assert not md.get("tokenizer.chat_template")
        with caplog.at_level(logging.WARNING, logger="infer"):
            tpl = ChatTemplate.from_metadata(md, "<bos>", "<eos>", origin=path.name)
    assert tpl.format == "gemma"
    assert "no chat template; using the gemma format (architecture gemma3)" in caplog.text
    assert tpl.render(SYS_CONV) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
