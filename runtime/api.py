"""LLM: the embedding facade (model + tokenizer + KV cache + the tokens it holds)."""
from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import ContextError, InferError, NumericError, TokenizerError
from .generate import Chunk, Engine, Stats, TextOut, generate_tokens
from .sampling import Sampler, SamplingParams

log = logging.getLogger("infer")


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list
    finish_reason: str
    stats: Stats


def default_threads() -> int:
    """Physical cores available to this process (logical CPUs when that cannot be told)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            proc = None
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "processor":
                    proc = int(v)
                elif k == "physical id":
                    phys = v.strip()
                elif k == "core id":
                    core = v.strip()
                    if proc in cpus:
                        cores.add((phys, core))
    except OSError:
        pass
    return max(1, len(cores) or len(cpus))


def open_model(gf):
    """(config, tokenizer, model) of an open GGUFFile: everything loading a model checks (its
    configuration, vocabulary, their agreement, the tensors the model needs); `infer inspect` runs
    the same checks."""
    from .config import ModelConfig
    from .models import load_model
    from .tokenizer import Tokenizer
    config = ModelConfig.from_metadata(gf.metadata, gf.path)
    tokenizer = Tokenizer.from_metadata(gf.metadata, gf.path)
    if tokenizer.n_vocab != config.n_vocab:
        raise TokenizerError(f"{gf.path}: vocabulary has {tokenizer.n_vocab} tokens but the "
                             f"model has {config.n_vocab} output rows")
    return config, tokenizer, load_model(gf, config)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LLM:
    """A GGUF model ready to generate text.

    >>> with infer.LLM("model.gguf", n_ctx=2048) as llm:
    ...     for chunk in llm.stream("Once upon a time", max_tokens=32):
    ...         print(chunk.text, end="")
    """

    def __init__(self, path, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int = 512, seed: int | None = None, context_policy: str = "stop",
                 n_keep: int = 4, sampling: SamplingParams | None = None,
                 int8_activations: bool = True, draft=None, lookup: int = 0, draft_max: int = 8,
                 speculative=None):
        """n_ctx: context length in tokens (default: the model's, at most 4096).
        context_policy: what happens when the context is full. "stop" (default): generation ends
        with finish_reason "context" and a prompt longer than the context is refused. "shift":
        the first n_keep tokens stay (attention sinks) and the oldest of the others make room
        (a sliding window, RoPE positions shifted as llama.cpp's context shift does), so prompts,
        conversations and generations can be of any length.
        seed: seeds the session's random generator (used by calls whose SamplingParams has no seed
        of its own; it is saved and restored with save_state/load_state).
        sampling: the default SamplingParams of calls that give none (`llm.sampling`, settable).
        int8_activations: the quantized matmuls quantize the activations to int8 (a scale per 4
        values; the prompt's last token in two int8 parts), as llama.cpp does with one scale per
        32 (AVX2 hosts; faster; the top token of float activations at >= 97 %); False keeps
        float32 activations (results equal a float reference up to rounding).
        draft / lookup / draft_max, or speculative (a SpeculativeConfig): speculative decoding
        (infer.speculative): drafts from a smaller model with the same vocabulary (a path or an
        open LLM) and/or looked up in the text (n-grams of up to `lookup` tokens), at most
        draft_max a round, checked in one pass; the text is the model's own."""
        from .gguf_file import GGUFFile

        self.path = os.fspath(path)
        self._gf = GGUFFile(self.path)
        try:
            self.config, self.tokenizer, self.model = open_model(self._gf)
        except BaseException:
            self._gf.close()
            raise
        if n_ctx is None:
            n_ctx = min(4096, self.config.n_ctx_train)
        try:
            if n_ctx < 1 or n_batch < 1:
                raise InferError(f"n_ctx and n_batch must be positive (got {n_ctx}, {n_batch})")
            self.n_ctx = int(n_ctx)
            self.n_threads = int(n_threads or default_threads())
            self.seed = seed
            self.rng = np.random.default_rng(seed)
            self.sampling = sampling or SamplingParams()
            self._set_threads()
            self.engine = Engine(self.model, self.n_ctx, min(n_batch, self.n_ctx), self.n_threads,
                                 context_policy, n_keep, int8_activations)
            self._set_threads()
            self._start_compile(int8_activations)
            self.metadata = self._gf.metadata
            self._drafters, self.speculative = [], None
            if speculative is None and (draft is not None or lookup):
                from .speculative import SpeculativeConfig
                speculative = SpeculativeConfig(draft=draft, lookup=lookup, draft_max=draft_max)
            if speculative is not None:
                from .speculative import open_drafters
                self._drafters = open_drafters(speculative, self)
                self.speculative = speculative
        except BaseException:
            self._gf.close()
            raise
        self.metadata = self._gf.metadata
        self._template = None
        self._fingerprint = None

    @property
    def context_policy(self) -> str:
        return self.engine.policy

    @property
    def n_keep(self) -> int:
        return self.engine.n_keep

    @property
    def n_tokens(self) -> int:
        """Tokens run through the context so far (prompt and replies; under "shift" this can exceed
        what the cache holds, `n_cached`)."""
        return len(self.engine.tokens)

    @property
    def n_cached(self) -> int:
        """Tokens whose keys and values are in the cache (at most n_ctx)."""
        return self.engine.kv.offset

    def _set_threads(self):
        import numba
        numba.set_num_threads(max(1, min(self.n_threads, numba.config.NUMBA_NUM_THREADS)))
        eng = getattr(self, "engine", None)
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(self.n_threads if eng is None else eng.scratch.blas_threads, user_api="blas")
        except ImportError:  # pragma: no cover - a declared dependency
            pass

    # --- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    # --- running --------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, add_bos, special, room: int = 1):
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_bos=add_bos, special=special)
        else:
            ids = [int(t) for t in prompt]
            for t in ids:
                self.tokenizer._check(t)
        if not ids:
            raise ContextError("empty prompt: nothing to run")
        if len(ids) + room > self.n_ctx and self.engine.policy == "stop":
            raise ContextError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx} tokens "
                               f"(raise n_ctx / -c, shorten the prompt, or use context_policy='shift')")
        return ids

    def logits(self, ids) -> np.ndarray:
        """Logits (len(ids), n_vocab) for every position of `ids`, run in a fresh context."""
        ids = self._prompt_ids(ids, None, False, room=0)
        self._set_threads()
        self.engine.reset()
        out = self.engine.prefill(ids, all_logits=True)
        return out

    def _start_compile(self, int8_activations):
        """First run with an empty kernel cache (kernels.warmup): say so, and compile the decode
        step in a second process while this one compiles the prompt's kernels."""
        from .kernels import warmup
        self.cold_start = warmup.is_cold() and os.environ.get(warmup.CHILD) != "1"
        self._background = None
        if not self.cold_start:
            return
        log.info("compiling kernels for this CPU, once: about %d s", warmup.ESTIMATE_S)
        if default_threads() > 1:
            self._background = warmup.Background(self.path, self.n_threads, int8_activations)
            self.model.pending = self._background

    @property
    def compiling(self) -> bool:
        """A first run's second process is still compiling the decode kernels (close() waits)."""
        bg = getattr(self, "_background", None)
        return bg is not None and bg.running()

    def _compiled(self):
        """After a first decode step: the kernels are in the cache."""
        from .kernels import warmup
        warmup.mark_warm()
        self.cold_start = False

    def stream(self, prompt, max_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: list[str] | None = None, add_bos: bool | None = None,
               special: bool = False) -> Iterator[Chunk]:
        """Generate from `prompt` (text or token ids), yielding Chunks of new text. The last chunk
        has finish_reason "stop" (end of generation or a stop string), "length" (max_tokens) or
        "context" (the context is full), and the stats. Closing the generator stops decoding."""
        ids = self._prompt_ids(prompt, add_bos, special)
        sampler = Sampler(sampling or self.sampling, self.rng)
        self._set_threads()
        return self._stream(ids, max_tokens, sampler, stop or [])

    def _stream(self, ids, max_tokens, sampler, stop):
        try:
            yield from self._stream_tokens(ids, max_tokens, sampler, stop)
        except NumericError as e:
            raise NumericError(f"{self.path}: {e}") from None

    def _stream_tokens(self, ids, max_tokens, sampler, stop):
        stats = Stats()
        out = TextOut(self.tokenizer, stop)
        stop_ids = frozenset(self.tokenizer.eot_ids)
        if self._drafters:
            from .speculative import speculative_tokens
            steps = speculative_tokens(self.engine, ids, sampler, max(1, max_tokens), stop_ids, stats,
                                       self._drafters, self.speculative)
        else:
            steps = generate_tokens(self.engine, ids, sampler, max(1, max_tokens), stop_ids, stats)
        for tok, reason in steps:
            if self.cold_start and stats.generated_tokens >= 2:
                self._compiled()
            text, stopped = out.add(tok, reason)
            if stopped:
                yield Chunk(text, tok, "stop", stats)
                return
            yield Chunk(text, tok, reason, stats if reason else None)

    def generate(self, prompt, max_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: list[str] | None = None, add_bos: bool | None = None, special: bool = False) -> Completion:
        parts, toks = [], []
        chunk = None
        for chunk in self.stream(prompt, max_tokens, sampling, stop, add_bos, special):
            parts.append(chunk.text)
            toks.append(chunk.token)
        return Completion("".join(parts), toks, chunk.finish_reason, chunk.stats)

    # --- chat -----------------------------------------------------------------------------------
    @property
    def chat_template(self):
        if self._template is None:
            from .chat_template import ChatTemplate
            tok = self.tokenizer
            piece = lambda i: tok.decode([i]) if i is not None and i >= 0 else ""  # noqa: E731
            self._template = ChatTemplate.from_metadata(self.metadata, piece(tok.bos_id), piece(tok.eos_id),
                                                        origin=self.path, add_bos=tok.add_bos)
        return self._template

    def chat_tokens(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation. The template's own markup is parsed for special
        tokens; message text is tokenized as plain text (a user typing <|im_start|> gets no
        special token)."""
        import uuid
        tag = uuid.uuid4().hex
        marks = [f"\x00{tag}{i}\x00" for i in range(len(messages))]
        masked = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
        text = self.chat_template.render(masked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        rest = text
        for i, m in enumerate(messages):
            head, sep, rest2 = rest.partition(marks[i])
            if not sep:        # the template transformed the content: fall back to plain rendering
                log.warning("chat template does not place message text verbatim; rendering it whole")
                return self.tokenizer.encode(self.chat_template.render(messages, add_generation_prompt),
                                             add_bos=None, special=True)
            ids += self.tokenizer.encode(head, add_bos=(None if not ids else False), special=True)
            ids += self.tokenizer.encode(m["content"], add_bos=False, special=False)
            rest = rest2
        ids += self.tokenizer.encode(rest, add_bos=False, special=True)
        return ids

    def chat_stream(self, messages, max_tokens: int = 512, sampling: SamplingParams | None = None,
                    stop: list[str] | None = None) -> Iterator[Chunk]:
        """Stream the assistant's reply to OpenAI-shaped messages; the KV of the common prefix with
        the previous call is reused, so a follow-up turn prefills only its new tokens."""
        return self.stream(self.chat_tokens(messages), max_tokens=max_tokens, sampling=sampling, stop=stop)

    def chat(self, messages, max_tokens: int = 512, sampling: SamplingParams | None = None,
             stop: list[str] | None = None) -> Completion:
        return self.generate(self.chat_tokens(messages), max_tokens=max_tokens, sampling=sampling, stop=stop)

    # --- sessions -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 identifying the model file (its header and samples of its tensor data)."""
        if self._fingerprint is None:
            from .session import model_fingerprint
            self._fingerprint = model_fingerprint(self._gf)
        return self._fingerprint

    def save_state(self, path, extra=None):
        """Save the session to `path` (atomically): the tokens run so far, the filled part of the
        KV cache, the default sampling parameters, the session random generator, and `extra` (any
        JSON-serializable data of the caller's). See infer/session.py for the format (no pickle)."""
        from .session import save
        save(path, self, extra)

    def load_state(self, path):
        """Load a session saved by save_state from the same model; returns its `extra`. A file from
        another model, truncated, or inconsistent raises StateError and leaves this session as it
        was. The next prompt that starts with the saved tokens prefills only what follows them."""
        from .session import load
        return load(path, self)

    # --- lifetime -------------------------------------------------------------------------------
    def close(self, finish_compile: bool = True):
        """Release the file and buffers. On a first run (an empty kernel cache) whose second
        process is still compiling the decode kernels, wait for it when a prompt ran here (so the
        cache is complete and the next start is warm; killed, it would start over every time),
        unless finish_compile is False (an interrupt: `with` on an exception)."""
        bg, self._background = getattr(self, "_background", None), None
        if bg is not None:
            model = getattr(self, "model", None)
            if finish_compile and bg.running() and model is not None and model.routes:
                log.info("infer: finishing the kernel compilation (once) ...")
                if bg.wait():
                    self._compiled()
            bg.close()
        for d in getattr(self, "_drafters", []):
            d.close()
        self._drafters = []
        gf, self._gf = getattr(self, "_gf", None), None
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.scratch.close()
        self.engine = self.model = None
        if gf is not None:
            gf.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(finish_compile=exc_type is None)

    def __repr__(self):
        return (f"LLM({self.path!r}, n_ctx={self.n_ctx}, n_threads={self.n_threads}, "
                f"context_policy={self.context_policy!r})")
