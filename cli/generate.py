"""`infer generate MODEL -p TEXT | -f FILE | -p -`: stream a completion to stdout."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import common


def register(app: typer.Typer):
    @app.command("generate")
    def generate(
        model: Optional[Path] = common.Model,
        prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text; '-' reads stdin."),
        file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt from a file."),
        n_predict: int = typer.Option(256, "-n", "--n-predict", help="Tokens to generate at most."),
        ctx: int = common.Ctx,
        threads: Optional[int] = common.Threads,
        temp: float = common.Temp,
        top_k: int = common.TopK,
        top_p: float = common.TopP,
        min_p: float = common.MinP,
        repeat_penalty: float = common.RepeatPenalty,
        seed: Optional[int] = common.Seed,
        special: bool = typer.Option(False, "--special", help="Parse special tokens (<|im_start|>...) in the prompt."),
        verbose: bool = typer.Option(False, "-v", "--verbose", help="Print timings and memory to stderr."),
        draft: Optional[Path] = common.Draft,
        draft_max: int = common.DraftMax,
        lookup: int = common.Lookup,
    ):
        """Generate text from a prompt, streamed to stdout."""
        import time
        t_start = time.perf_counter()
        from infer.errors import InferError
        if (prompt is None) == (file is None):
            raise InferError("give the prompt with exactly one of -p TEXT, -p - (stdin) or -f FILE")
        if file is not None:
            try:
                text = file.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as e:
                raise InferError(f"{file}: cannot read prompt file ({e.strerror})") from None
        elif prompt == "-":
            text = sys.stdin.read()
        else:
            text = prompt
        model = common.resolve_model(model)
        notice = common.CompileNotice()
        from infer.api import LLM, peak_rss_bytes
        params = common.sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
        with LLM(model, n_ctx=ctx, n_threads=threads, draft=draft, lookup=lookup, draft_max=draft_max) as llm:
            t_load = time.perf_counter() - t_start
            out = sys.stdout
            chunk = None
            try:
                for chunk in llm.stream(text, max_tokens=n_predict, sampling=params, special=special):
                    notice.done()
                    out.write(chunk.text)
                    out.flush()
            finally:
                notice.done()
            out.write("\n")
            out.flush()
            if verbose and chunk is not None:
                s = chunk.stats
                import numba
                print(f"\nmodel: {model} | threads: {llm.n_threads} ({numba.threading_layer()}) | "
                      f"ctx: {llm.n_ctx} | load: {t_load:.2f} s\n"
                      f"prompt tokens: {s.prompt_tokens} (cached {s.cached_tokens}) | "
                      f"prefill: {s.prefill_tokens} tok in {s.prefill_s:.3f} s = {s.prefill_tps:.1f} tok/s\n"
                      f"TTFT: {s.ttft_s * 1000:.0f} ms | decode: {s.generated_tokens} tok, {s.decode_tps:.1f} tok/s | "
                      f"finish: {chunk.finish_reason} | peak RSS: {peak_rss_bytes() / 2**20:.0f} MiB"
                      + common.spec_stats(s),
                      file=sys.stderr)
            notice.finishing(llm)
