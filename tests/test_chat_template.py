"""Chat templates: the model's own template renders as Hugging Face's would; hostile templates fail
cleanly, fast, and without side effects."""
from __future__ import annotations

import time

import pytest

from infer.chat_template import ChatTemplate
from infer.errors import TemplateError
from infer.gguf_file import GGUFFile

MSGS = [{"role": "user", "content": "Hi <|im_start|> there"}]


def test_smollm2_template(smollm2_path):
    with GGUFFile(smollm2_path) as gf:
        tpl = ChatTemplate(gf.metadata["tokenizer.chat_template"], origin=str(smollm2_path))
    text = tpl.render(MSGS)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi <|im_start|> there<|im_end|>\n<|im_start|>assistant\n")


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
])
def test_hostile_templates_fail_cleanly(payload, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(TemplateError):
        ChatTemplate(payload, origin="evil.gguf").render(MSGS)
    assert time.perf_counter() - t0 < 5
    import os
    assert not os.path.exists("/tmp/infer-pwned")


def test_missing_template_falls_back_with_warning(caplog):
    with caplog.at_level("WARNING", logger="infer"):
        tpl = ChatTemplate(None, origin="plain.gguf")
    assert "no chat template" in caplog.text
    assert tpl.render(MSGS) == "<|im_start|>user\nHi <|im_start|> there<|im_end|>\n<|im_start|>assistant\n"
