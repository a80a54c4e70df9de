"""`infer chat MODEL`: an interactive chat in the terminal (or a scripted one through a pipe).

In a terminal: line editing and history (prompt_toolkit), replies streamed as they are made,
Ctrl-C stops a reply and keeps the conversation (the cut reply stays in it), Ctrl-C at the prompt
or Ctrl-D leaves. With stdin not a terminal: every line is a message (or a command), every reply
goes to stdout followed by a newline, and nothing else does (errors and --verbose go to stderr).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import common

HELP = """\
Commands:
  /set temp 0.7         sampling: temp, top_k, top_p, min_p, repeat_penalty, seed (a number, or
                        none: random), max_tokens
  /set system TEXT      set the system message (and start over)
  /set verbose | quiet  timings after each reply, or not
  /show                 settings and the context used
  /clear                forget the conversation (the system message stays)
  /save FILE            save the session (conversation, KV cache, sampler) to FILE
  /load FILE            load a session saved from the same model
  /bye                  leave (Ctrl-D too; Ctrl-C at the prompt too)
  /?, /help             this help
Begin a message with \"\"\" to write several lines; end it with \"\"\".
Ctrl-C during a reply stops the reply; the conversation keeps what was said."""

SETTINGS = {          # /set name -> (SamplingParams field or None, parser)
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float), "repeat_last_n": ("repeat_last_n", int),
    "seed": ("seed", None), "max_tokens": (None, int),
}
STATE_KEY = "infer.chat"


class ChatError(Exception):
    """A command's error: reported as one line, the session goes on."""


class Chat:
    """The conversation and its settings; `handle(line)` does what one input says."""

    def __init__(self, llm, system: Optional[str], max_tokens: int, verbose: bool, out=sys.stdout,
                 err=sys.stderr, interactive: bool = True):
        self.llm, self.system, self.max_tokens, self.verbose = llm, system, max_tokens, verbose
        self.out, self.err, self.interactive = out, err, interactive
        self.messages: list[dict] = []
        self._stop = False
        self.notice = None          # a first run's CompileNotice (cli/common.py)

    # --- conversation ---------------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages

    def context_tokens(self) -> int:
        msgs = self.conversation()
        return len(self.llm.chat_tokens(msgs, add_generation_prompt=False)) if msgs else 0

    def note(self, text: str):
        """A remark about the session: on the terminal, or on stderr when scripted."""
        print(text, file=self.out if self.interactive else self.err, flush=True)

    def reply(self, text: str):
        from infer.errors import InferError
        self.messages.append({"role": "user", "content": text})
        parts, last = [], None
        self._stop = False
        old = _catch_sigint(self)
        try:
            if self.notice is not None:
                self.notice.start()
            gen = self.llm.chat_stream(self.conversation(), max_tokens=self.max_tokens)
            try:
                for chunk in gen:
                    if self.notice is not None:
                        self.notice.done()
                    if chunk.text:
                        parts.append(chunk.text)
                        self.out.write(chunk.text)
                        self.out.flush()
                    last = chunk
                    if self._stop:
                        break
            finally:
                gen.close()
                if self.notice is not None:
                    self.notice.done()
        except InferError:
            self.messages.pop()          # the message was not answered: it is not part of the conversation
            raise
        finally:
            _restore_sigint(old)
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        reason = last.finish_reason if last is not None else None
        if self._stop and reason is None:
            self.note("[stopped]")
        elif reason == "context":
            self.note(f"[context full ({self.llm.n_ctx} tokens): /clear to start over, or run with "
                      f"--context-policy shift]")
        if self.verbose and last is not None and last.stats is not None:
            s = last.stats
            print(f"[prefill {s.prefill_tokens} new + {s.cached_tokens} cached tokens in {s.prefill_s * 1000:.0f} ms"
                  f" | TTFT {s.ttft_s * 1000:.0f} ms | {s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s"
                  f" | {reason} | context {self.llm.n_tokens}/{self.llm.n_ctx}{common.spec_stats(s)}]",
                  file=self.err, flush=True)

    # --- commands -------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Run one input (a message or a /command). Returns False when the session should end."""
        if not line.strip():
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        cmd, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if cmd in ("bye", "exit", "quit"):
            return False
        if cmd in ("?", "help"):
            print(HELP, file=self.out, flush=True)
        elif cmd == "set":
            self.set(arg)
        elif cmd == "show":
            self.show()
        elif cmd == "clear":
            self.messages = []
            self.note("cleared the conversation")
        elif cmd == "save":
            self.save(arg)
        elif cmd == "load":
            self.load(arg)
        else:
            raise ChatError(f"unknown command /{cmd} (/? for help)")
        return True

    def set(self, arg: str):
        name, _, value = arg.partition(" ")
        name, value = name.strip().lower().replace("-", "_"), value.strip()
        if name == "system":
            self.system = value or None
            self.messages = []
            self.note("system message set; conversation cleared")
            return
        if name in ("verbose", "quiet"):
            self.verbose = name == "verbose"
            self.note(f"verbose {'on' if self.verbose else 'off'}")
            return
        if name not in SETTINGS or not value:
            raise ChatError(f"usage: /set NAME VALUE with NAME one of {', '.join(sorted(SETTINGS))}, "
                            f"system, verbose, quiet")
        field, parse = SETTINGS[name]
        try:
            if field == "seed":
                v = None if value.lower() in ("none", "random", "-1") else int(value)
            else:
                v = parse(value)
        except ValueError:
            raise ChatError(f"/set {name}: {value!r} is not a valid number") from None
        if field is None:
            if v < 1:
                raise ChatError("/set max_tokens: must be at least 1")
            self.max_tokens = v
        else:
            from infer.errors import InferError
            try:
                self.llm.sampling = self.llm.sampling.replace(**{field: v})
            except InferError:
                raise ChatError(f"/set {name}: {value} is out of range") from None
        self.note(f"set {name} = {v if v is not None else 'none'}")

    def settings_line(self) -> str:
        p = self.llm.sampling
        return (f"temp {p.temperature:g} | top_k {p.top_k} | top_p {p.top_p:g} | min_p {p.min_p:g} | "
                f"repeat_penalty {p.repeat_penalty:g} (last {p.repeat_last_n}) | "
                f"seed {'none' if p.seed is None else p.seed} | max_tokens {self.max_tokens}")

    def show(self):
        llm = self.llm
        policy = llm.context_policy + (f", keep {llm.n_keep}" if llm.context_policy == "shift" else "")
        turns = sum(m["role"] == "user" for m in self.messages)
        name = f" ({llm.config.name})" if llm.config.name else ""
        print(f"model: {os.path.basename(llm.path)}{name}\n"
              f"context: {self.context_tokens()} tokens in the conversation ({len(self.messages)} messages, "
              f"{turns} turns); KV cache {llm.n_cached}/{llm.n_ctx} tokens; policy {policy}\n"
              + (f"system: {self.system!r}" if self.system else "system: (the template's default)") + "\n"
              + self.settings_line(), file=self.out, flush=True)

    def save(self, arg: str):
        if not arg:
            raise ChatError("usage: /save FILE")
        path = Path(arg).expanduser()
        self.llm.save_state(path, extra={STATE_KEY: {"messages": self.messages, "system": self.system,
                                                     "max_tokens": self.max_tokens}})
        self.note(f"saved the session to {path} ({len(self.messages)} messages, {self.llm.n_tokens} tokens)")

    def load(self, arg: str):
        if not arg:
            raise ChatError("usage: /load FILE")
        path = Path(arg).expanduser()
        before = self.llm.sampling
        extra = self.llm.load_state(path)
        chat = extra.get(STATE_KEY) if isinstance(extra, dict) else None
        ok = isinstance(chat, dict) and isinstance(chat.get("messages"), list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in chat["messages"])
        if not ok:
            self.llm.sampling = before
            raise ChatError(f"{path}: holds no chat conversation (saved by a program, not by /save?)")
        self.messages = list(chat["messages"])
        self.system = chat.get("system") if isinstance(chat.get("system"), str) else None
        if isinstance(chat.get("max_tokens"), int) and chat["max_tokens"] > 0:
            self.max_tokens = chat["max_tokens"]
        self.note(f"loaded {path}: {len(self.messages)} messages, {self.llm.n_tokens} tokens")


def _catch_sigint(chat: Chat):
    """During a reply, Ctrl-C sets a flag (checked between tokens) instead of raising in the middle
    of the model's work."""
    def on_sigint(signum, frame):
        chat._stop = True
    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:          # not the main thread
        return None


def _restore_sigint(old):
    if old is not None:
        signal.signal(signal.SIGINT, old)


# --- input ----------------------------------------------------------------------------------------
def _history():
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    path = os.environ.get("INFER_HISTORY")
    if path is None:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        path = os.path.join(state, "infer", "chat_history")
    if not path:
        return InMemoryHistory()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "a").close()
        return FileHistory(path)
    except OSError:
        return InMemoryHistory()


def terminal_lines():
    """Inputs typed in a terminal (a \"\"\" block is one input). Ends on Ctrl-D or Ctrl-C."""
    from prompt_toolkit import PromptSession
    session = PromptSession(history=_history())
    while True:
        try:
            line = session.prompt(">>> ")
            if line.lstrip().startswith('"""'):
                body = line.lstrip()[3:]
                while not body.rstrip().endswith('"""'):
                    body += "\n" + session.prompt("... ")
                line = body.rstrip()[:-3]
        except (EOFError, KeyboardInterrupt):
            return
        yield line


def piped_lines(stream):
    """Inputs read from a pipe: one per line; a \"\"\" block is one input."""
    lines = iter(stream)
    for line in lines:
        line = line.rstrip("\n")
        if line.lstrip().startswith('"""'):
            body = line.lstrip()[3:]
            while not body.rstrip().endswith('"""'):
                nxt = next(lines, None)
                if nxt is None:
                    break
                body += "\n" + nxt.rstrip("\n")
            line = body.rstrip()
            line = line[:-3] if line.endswith('"""') else line
        yield line


def run(chat: Chat, lines) -> None:
    from infer.errors import InferError
    for line in lines:
        try:
            if not chat.handle(line):
                return
        except (ChatError, InferError) as e:
            print(f"error: {e}", file=chat.err, flush=True)


def register(app: typer.Typer):
    @app.command("chat")
    def chat_cmd(
        model: Optional[Path] = common.Model,
        system: Optional[str] = typer.Option(None, "-s", "--system", help="System message."),
        ctx: int = common.Ctx,
        threads: Optional[int] = common.Threads,
        temp: float = common.Temp,
        top_k: int = common.TopK,
        top_p: float = common.TopP,
        min_p: float = common.MinP,
        repeat_penalty: float = common.RepeatPenalty,
        seed: Optional[int] = common.Seed,
        max_tokens: int = typer.Option(1024, "-n", "--max-tokens", help="Tokens per reply at most."),
        policy: str = typer.Option("stop", "--context-policy", envvar="INFER_CONTEXT_POLICY",
                                   help="When the context is full: stop (end the reply) or shift (forget "
                                        "the oldest tokens, keep the first --keep)."),
        keep: int = typer.Option(4, "--keep", help="Tokens kept at the start under --context-policy shift."),
        load: Optional[Path] = typer.Option(None, "--load", help="Start from a session saved with /save."),
        verbose: bool = typer.Option(False, "-v", "--verbose",
                                     help="After each reply: prefill tokens (new/cached), TTFT, tokens/s."),
        draft: Optional[Path] = common.Draft,
        draft_max: int = common.DraftMax,
        lookup: int = common.Lookup,
    ):
        """Chat with a model (type /? for commands). Reads one message per line when stdin is not a terminal."""
        from infer.api import LLM
        from infer.errors import InferError
        if max_tokens < 1:
            raise InferError(f"--max-tokens must be at least 1 (got {max_tokens})")
        model = common.resolve_model(model)
        notice = common.CompileNotice(start=False)
        params = common.sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        with LLM(model, n_ctx=ctx, n_threads=threads, context_policy=policy, n_keep=keep,
                 sampling=params, draft=draft, lookup=lookup, draft_max=draft_max) as llm:
            chat = Chat(llm, system, max_tokens, verbose, interactive=interactive)
            chat.notice = notice
            if load is not None:
                try:
                    chat.load(str(load))
                except ChatError as e:
                    raise InferError(str(e)) from None
            if interactive:
                print(f"infer chat: {model.name} (context {llm.n_ctx} tokens, policy {llm.context_policy}). "
                      f"/? for help, /bye or Ctrl-D to leave.", flush=True)
                run(chat, terminal_lines())
            else:
                run(chat, piped_lines(sys.stdin))
            notice.finishing(llm)
