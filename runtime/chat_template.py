"""Chat templates (`tokenizer.chat_template`) rendered in jinja2's ImmutableSandboxedEnvironment.

Templates come from model files, i.e. from strangers: the sandbox blocks attribute access to
internals (`__globals__`, `__class__`, ...), `range` is capped, and the output size is capped, so
a template can neither run code nor hang nor eat memory. Helpers as Hugging Face templates expect:
raise_exception, strftime_now, bos_token, eos_token, add_generation_prompt.
"""
from __future__ import annotations

import datetime
import logging

from .errors import TemplateError

log = logging.getLogger("infer")

MAX_OUTPUT = 1 << 20          # characters a template may produce
MAX_RANGE = 100_000           # longest range() a template may build

# ChatML: what a model without a template gets (documented in the README)
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _Capped(str):
    pass


def _env():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise SecurityError("exponent too large")
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > MAX_OUTPUT:
                        raise SecurityError("sequence repetition too large")
            return super().call_binop(context, operator, left, right)

        def call(self, __context, __obj, *args, **kwargs):
            if __obj is range:
                r = range(*args)
                if len(r) > MAX_RANGE:
                    raise SecurityError(f"range of {len(r)} items is too long")
                return r
            return super().call(__context, __obj, *args, **kwargs)

    env = Env(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)

    def raise_exception(msg):
        raise TemplateError(f"chat template raised: {msg}")

    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
                       range=range)
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", origin: str = "model"):
        self.origin = origin
        if not source:
            log.warning("%s has no chat template; using the default (ChatML)", origin)
            source = DEFAULT_TEMPLATE
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._tpl = _env().from_string(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"{origin}: chat template does not parse: {e}") from None

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TemplateError(f"message #{i} must be a dict with string 'role' and 'content'")
        out, n = [], 0
        try:
            for piece in self._tpl.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token, eos_token=self.eos_token, **extra):
                n += len(piece)
                if n > MAX_OUTPUT:
                    raise TemplateError(f"{self.origin}: chat template output exceeds {MAX_OUTPUT} characters")
                out.append(piece)
        except TemplateError:
            raise
        except Exception as e:
            raise TemplateError(f"{self.origin}: chat template failed: {type(e).__name__}: {e}") from None
        return "".join(out)
