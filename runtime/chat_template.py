"""Chat templates (`tokenizer.chat_template`) rendered in jinja2's ImmutableSandboxedEnvironment.

Templates come from model files, i.e. from strangers: the sandbox blocks attribute access to
internals (`__globals__`, `__class__`, ...), `range` is capped, and the output size is capped, so
a template can neither run code nor hang nor eat memory.

A template sees what Hugging Face's `apply_chat_template` gives it: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a `tojson`
that neither escapes HTML nor sorts keys, jinja2's loop controls (`{% break %}`, `{% continue %}`)
and the `{% generation %}` block (its body is rendered; transformers uses it to mark the
assistant's tokens); `tools`, `documents` and any other variable only when the caller passes them.
As llama.cpp does: `tools` stays undefined without tools (transformers' None breaks the tool-use
variants that loop over it), `date_string` and `datetime` hold today's date, `+` takes None and
undefined as '' next to a string, a template that refuses a system message (or drops it) gets
its text folded into the next message, and a BOS the template writes first is dropped when the
tokenizer adds one. Error messages are one line (TemplateError).

A file without a template gets its family's known format (FORMATS), chosen by
`general.architecture` and, where the architecture does not settle it (llama: Llama 2 or 3, or
a ChatML fine-tune), by the special tokens in the vocabulary; ChatML when nothing matches.
"""
from __future__ import annotations

import datetime
import json
import logging
import types

from .errors import TemplateError

log = logging.getLogger("infer")

MAX_OUTPUT = 1 << 20          # characters a template may produce
MAX_RANGE = 100_000           # longest range() a template may build

# Formats for a file without a template, after llama.cpp's built-in formatters (llama-chat.cpp)
# and the families' own templates. No BOS at the start: the tokenizer adds it as the file says.
FORMATS = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Gemma has no system role: its template puts the system text before the first user turn
    "gemma": (
        "{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = ns.system + (m['content'] | trim) + '\n\n' %}"
        "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' }}"
        "{% if role != 'model' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ (m['content'] | trim) + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "llama3": (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # Meta's Llama 2 chat: BOS before every [INST] but the first, the system inside <<SYS>>
    "llama2": (
        "{% set ns = namespace(system='', first=true) %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = '<<SYS>>\n' + (m['content'] | trim) + '\n<</SYS>>\n\n' %}"
        "{% elif m['role'] == 'user' %}"
        "{{ ('' if ns.first else bos_token) + '[INST] ' + ns.system + (m['content'] | trim) + ' [/INST]' }}"
        "{% set ns.system = '' %}{% set ns.first = false %}"
        "{% else %}{{ ' ' + (m['content'] | trim) + ' ' + eos_token }}{% set ns.first = false %}{% endif %}"
        "{% endfor %}"),
    # Mistral (v3 vocabulary: [INST] is a control token); the system text opens the next [INST]
    "mistral": (
        "{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + '[/INST]' }}{% set ns.system = '' %}"
        "{% else %}{{ ' ' + (m['content'] | trim) + eos_token }}{% endif %}{% endfor %}"),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
DEFAULT_TEMPLATE = FORMATS["chatml"]       # nothing known about the model (documented in the README)

# general.architecture -> format; the others are told apart by their vocabulary (VOCAB_HINTS)
ARCH_FORMATS = {
    **dict.fromkeys(["gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding"], "gemma"),
    **dict.fromkeys(["qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "smollm3"], "chatml"),
    "phi3": "phi3",
}
# special tokens that identify a format, checked in this order: ChatML first, since no base
# vocabulary of these families has <|im_start|> (a fine-tune added it: SmolLM2 on llama, Hermes on
# Llama 3); Llama 2 and Mistral v1 vocabularies have [INST] as plain text only
VOCAB_HINTS = [("chatml", ("<|im_start|>", "<|im_end|>")),
               ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
               ("gemma", ("<start_of_turn>", "<end_of_turn>")),
               ("mistral", ("[INST]", "[/INST]")),
               ("phi3", ("<|user|>", "<|assistant|>", "<|end|>"))]
ARCH_DEFAULTS = {"llama": "llama2", "mistral": "mistral"}   # when no hint matches

_PROBE_SYSTEM, _PROBE_USER = "\x01infer-probe-system\x01", "\x01infer-probe-user\x01"


def fallback_format(arch: str | None, vocab=()) -> str:
    """Name of the FORMATS entry for a file without a chat template."""
    if arch in ARCH_FORMATS:
        return ARCH_FORMATS[arch]
    tokens = set(vocab or ())
    for name, needed in VOCAB_HINTS:
        if all(t in tokens for t in needed):
            return name
    return ARCH_DEFAULTS.get(arch, "chatml")


def _listed(x):
    if isinstance(x, types.GeneratorType):
        return list(x)
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def _one_line(e) -> str:
    return " ".join(str(e).split())


def _env(origin: str):
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.runtime import Undefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's tokens with
        it (return_assistant_tokens_mask); for a prompt only its body matters."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "+":
                # llama.cpp's runtime: None / undefined next to a string concatenate as ''
                if isinstance(left, str) and (right is None or isinstance(right, Undefined)):
                    return left
                if isinstance(right, str) and (left is None or isinstance(left, Undefined)):
                    return right
                if (isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple))
                        and len(left) + len(right) > MAX_OUTPUT):
                    raise SecurityError("concatenation too large")
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

    # as transformers: trim_blocks and lstrip_blocks, a template's final newline dropped
    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])

    def raise_exception(msg):
        raise TemplateError(f"{origin}: chat template raised: {_one_line(msg)}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # a filter's generator (tools | map(attribute='function')) as the list llama.cpp makes of it
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys,
                          default=_listed)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
                       range=range)
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", origin: str = "model",
                 arch: str | None = None, vocab=(), add_bos: bool = False):
        """source: the file's tokenizer.chat_template; None or '' picks a known format from `arch`
        (general.architecture) and `vocab` (the token strings). add_bos: the tokenizer adds BOS
        itself, so render() drops a BOS the template writes first (as llama.cpp does)."""
        self.origin, self.add_bos = origin, add_bos
        self.format = None               # the FORMATS entry used for a file without a template
        if not source:
            self.format = fallback_format(arch, vocab)
            log.warning("%s has no chat template; using the %s format (architecture %s)",
                        origin, self.format, arch or "unknown")
            source = FORMATS[self.format]
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._system_ok = None
        try:
            self._tpl = _env(origin).from_string(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"{origin}: chat template does not parse: {_one_line(e)}") from None

    @classmethod
    def from_metadata(cls, metadata: dict, bos_token: str = "", eos_token: str = "", origin: str = "model",
                      add_bos: bool | None = None):
        """The template of a GGUF file's metadata, or its family's format when it has none.
        add_bos: None reads tokenizer.ggml.add_bos_token."""
        source = metadata.get("tokenizer.chat_template")
        vocab = () if source else metadata.get("tokenizer.ggml.tokens", ())
        if add_bos is None:
            add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        return cls(source, bos_token, eos_token, origin, arch=metadata.get("general.architecture"), vocab=vocab,
                   add_bos=add_bos)

    @property
    def supports_system_role(self) -> bool:
        """Whether a system message's text reaches the output (llama.cpp's capability probe): a
        template that raises on one, or drops it, gets it folded into the next message."""
        if self._system_ok is None:
            probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
            try:
                self._system_ok = _PROBE_SYSTEM in self._render(probe, True, {})
            except TemplateError:
                self._system_ok = False
            if not self._system_ok:
                log.info("%s: the chat template takes no system message; it goes into the first user turn",
                         self.origin)
        return self._system_ok

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the model's prompt text. `extra` reaches the template as variables
        (tools=[...], documents=[...], enable_thinking=False, date_string='26 Jul 2024', ...)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TemplateError(f"message #{i} must be a dict with string 'role' and 'content'")
        messages = list(messages)
        if messages and messages[0]["role"] == "system" and not self.supports_system_role:
            # as llama.cpp: the system text opens the next message, or goes if there is none
            if len(messages) > 1:
                messages[1] = {**messages[1], "content": messages[0]["content"] + "\n" + messages[1]["content"]}
            else:
                log.warning("%s: the chat template takes no system message; a lone one is left out", self.origin)
            messages = messages[1:]
        text = self._render(messages, add_generation_prompt, extra)
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]      # {{ bos_token }} + the tokenizer's BOS: one BOS, not two
        return text

    def _render(self, messages, add_generation_prompt, extra) -> str:
        today = datetime.date.today()
        ctx = {"date_string": today.strftime("%d %b %Y"), "datetime": today.strftime("%b %d %Y"),
               **extra, "messages": messages, "add_generation_prompt": add_generation_prompt,
               "bos_token": self.bos_token, "eos_token": self.eos_token}
        out, n = [], 0
        try:
            for piece in self._tpl.generate(**ctx):
                n += len(piece)
                if n > MAX_OUTPUT:
                    raise TemplateError(f"{self.origin}: chat template output exceeds {MAX_OUTPUT} characters")
                out.append(piece)
        except TemplateError:
            raise
        except Exception as e:
            raise TemplateError(f"{self.origin}: chat template failed: {type(e).__name__}: {_one_line(e)}") from None
        return "".join(out)
