"""`infer perplexity MODEL -f TEXT [-c 512] [--chunks N] [--kl-base FILE | --kl FILE]`: llama-perplexity's
method; running PPL per chunk, then `PPL = x +/- y` (and the KL divergence figures with --kl)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import common


def register(app: typer.Typer):
    @app.command("perplexity")
    def perplexity(
        model: Path = typer.Argument(..., help="GGUF model file."),
        file: Path = typer.Option(..., "-f", "--file", help="Text to score (one trailing newline is dropped)."),
        ctx: int = typer.Option(512, "-c", "--ctx", envvar="INFER_PPL_CTX", help="Chunk length in tokens."),
        chunks: Optional[int] = typer.Option(None, "--chunks", help="Score only the first N chunks."),
        batch: Optional[int] = typer.Option(None, "-b", "--batch", help="Prefill batch (default: the chunk)."),
        threads: Optional[int] = common.Threads,
        kl_base: Optional[Path] = typer.Option(None, "--kl-base",
                                               help="Write this (base) model's log-probs to FILE (.npz)."),
        kl: Optional[Path] = typer.Option(None, "--kl", help="Compare against base log-probs in FILE: KL "
                                          "divergence, same top token, delta-p, PPL ratio."),
        top_k: int = typer.Option(32, "--kl-top-k", help="Log-probs stored per token with --kl-base."),
    ):
        """Perplexity of a model on a text, computed as llama-perplexity does."""
        from infer.errors import InferError
        from infer.perplexity import perplexity as run, read_text
        if kl_base is not None and kl is not None:
            raise InferError("give at most one of --kl-base FILE (write) and --kl FILE (compare)")
        if not read_text(file):              # fail on a bad text file before loading the model
            raise InferError(f"{file}: text is empty")
        import infer
        with _Progress() as progress, infer.LLM(model, n_ctx=ctx, n_threads=threads,
                                                n_batch=batch or ctx, int8_activations=False) as llm:
            r = run(llm, file, n_ctx=ctx, n_chunks=chunks, progress=progress, kl_base=kl_base, kl=kl,
                    kl_top_k=top_k)
        _report(r, file, kl_base)


class _Progress:
    """Prints the running PPL after each chunk (stdout), with a rich bar on stderr when it is a tty."""

    def __init__(self):
        self.bar = self.task = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                                redirect_stdout=False, redirect_stderr=False)
            self.bar.start()
            self.task = self.bar.add_task("perplexity", total=None)
        return self

    def __call__(self, done, total, ppl):
        line = f"[{done}/{total}] PPL = {ppl:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, description=f"PPL {ppl:.4f}")
            if sys.stdout.isatty():          # same terminal: print above the bar
                self.bar.console.print(line, highlight=False)
                return
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _report(r, file, kl_base):
    out = typer.echo
    out(f"PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")
    out(f"{r.n_tokens_scored} tokens scored in {r.n_chunks} chunks of {r.n_ctx} ({file}, {r.n_tokens} tokens); "
        f"{r.seconds:.1f} s, {r.tokens_per_s:.1f} tokens/s")
    if kl_base is not None:
        out(f"wrote base log-probs to {kl_base}")
    k = r.kl
    if k is None:
        return
    p = k.kld_percentiles
    out(f"\n=== KL divergence vs {k.base_file} ({k.n_tokens} tokens, top-{k.top_k} + rest) ===")
    out(f"PPL(Q)              : {k.ppl:10.4f}")
    out(f"PPL(base)           : {k.ppl_base:10.4f}")
    out(f"PPL(Q)/PPL(base)    : {k.ppl_ratio:10.4f}   ln ratio {k.ln_ppl_ratio:+.5f} +/- {k.ln_ppl_ratio_stderr:.5f}")
    out(f"Mean KLD            : {k.mean_kld:10.6f} +/- {k.kld_stderr:.6f}")
    for name in ("max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"):
        label = f"{name}%" if name[0].isdigit() else name.capitalize()
        out(f"{label + ' KLD':<20}: {p[name]:10.6f}")
    out(f"Same top token      : {k.same_top_pct:9.3f} % +/- {k.same_top_stderr:.3f} %")
    out(f"Mean delta-p        : {100 * k.mean_dp:+9.3f} %")
    out(f"RMS delta-p         : {100 * k.rms_dp:9.3f} %")
