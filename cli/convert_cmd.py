"""`infer convert HF_DIR -o OUT.gguf --type TYPE`: a Hugging Face safetensors folder to a GGUF file."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import common

TYPES_HELP = ("f32, f16, bf16, q8_0 (default), q4_0, q4_1, or a mixed INT4 recipe: q4_0_mixed / q4_1_mixed "
              "(embeddings, output, attn_v and some ffn_down kept at q8_0). 1-D tensors are always f32.")


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        hf_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json, *.safetensors, tokenizer)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="GGUF file to write."),
        type: str = typer.Option("q8_0", "--type", "-t", envvar="INFER_CONVERT_TYPE", help=TYPES_HELP),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan and the expected file size; write nothing."),
        force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUTPUT if it exists."),
        imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix from `infer calibrate`: "
                                               "Q4_0/Q4_1 blocks minimize the importance-weighted error."),
        calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Calibration text: convert to a "
                                                 "temporary f16/bf16 GGUF, run it on TEXT to collect the "
                                                 "importance matrix, then quantize with it (q4_* types)."),
        calib_ctx: int = typer.Option(512, "--calib-ctx", help="Chunk length (tokens) for --calibrate."),
        calib_chunks: Optional[int] = typer.Option(None, "--calib-chunks", help="Use only the first N chunks "
                                                   "of the --calibrate text."),
        threads: Optional[int] = common.Threads,
    ):
        """Convert a safetensors checkpoint (Llama, Mistral, Qwen2) to a GGUF file llama.cpp, ollama and infer load."""
        from infer.errors import ConvertError
        from infer.convert.pipeline import attach_imatrix, make_plan, write_plan

        if output is None and not dry_run:
            raise ConvertError("no output file: give -o OUT.gguf (or --dry-run)")
        if imatrix is not None and calibrate is not None:
            raise ConvertError("give at most one of --imatrix FILE and --calibrate TEXT")
        if output is not None and not dry_run:
            from infer.convert.pipeline import _check_dst
            _check_dst(output, force)
        if calibrate is not None and not dry_run:
            _convert_calibrated(hf_dir, output, type, calibrate, calib_ctx, calib_chunks, force, threads)
            return
        plan = make_plan(hf_dir, type)
        try:
            if imatrix is not None:
                attach_imatrix(plan, imatrix)
            if dry_run:
                typer.echo(plan.table())
                return
            import time
            t0 = time.perf_counter()
            with _progress(plan) as progress:
                write_plan(plan, output, force=force, progress=progress)
            dt = time.perf_counter() - t0
        finally:
            plan.checkpoint.close()
        extra = f", importance matrix {imatrix}" if imatrix is not None else ""
        typer.echo(f"wrote {output}: {len(plan.tensors)} tensors, {plan.file_size / 1e6:.1f} MB "
                   f"({plan.recipe.name}{extra}, {plan.spec.gguf_arch}) in {dt:.1f} s")


def _convert_calibrated(hf_dir, output, type, text, ctx, chunks, force, threads):
    from infer.calibrate import convert_calibrated
    from infer.perplexity import read_text
    from infer.errors import InferError
    if not read_text(text):                  # a bad text file fails before any conversion
        raise InferError(f"{text}: text is empty")

    def calib_progress(done, total):
        typer.echo(f"calibrating on {text}: chunk {done}/{total}", err=True)

    s, im = convert_calibrated(hf_dir, output, type, text, n_ctx=ctx, n_chunks=chunks, force=force,
                               n_threads=threads, calib_progress=calib_progress)
    typer.echo(f"wrote {output}: {s.n_tensors} tensors, {s.n_bytes / 1e6:.1f} MB ({s.type}, calibrated on "
               f"{im.source.get('n_tokens')} tokens of {text}, {s.arch}) in {s.seconds:.1f} s")


class _progress:
    """A rich progress bar on stderr (tensor name, bytes) when stderr is a terminal; else nothing."""

    def __init__(self, plan):
        self.plan = plan
        self.bar = None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("header", total=self.plan.file_size)

        def update(name, done, total):
            self.bar.update(task, completed=done, description=name)
        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
