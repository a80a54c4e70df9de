"""`infer calibrate MODEL -f TEXT -o STATS [-c 512] [--chunks N]`: the importance matrix of a (float)
model on a text, for `infer convert --imatrix STATS` (calibrated q4_0 / q4_1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import common


def register(app: typer.Typer):
    @app.command("calibrate")
    def calibrate(
        model: Path = typer.Argument(..., help="GGUF model file, preferably f16/bf16/f32 (infer convert --type f16)."),
        file: Path = typer.Option(..., "-f", "--file", help="Calibration text (not the text you evaluate on)."),
        output: Path = typer.Option(..., "-o", "--output", help="Importance matrix file to write (.npz)."),
        ctx: int = typer.Option(512, "-c", "--ctx", help="Chunk length in tokens."),
        chunks: Optional[int] = typer.Option(None, "--chunks", help="Use only the first N chunks."),
        threads: Optional[int] = common.Threads,
        force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    ):
        """Collect per-input-channel activation statistics (an importance matrix) of every matmul weight."""
        from infer.calibrate import calibrate as run
        from infer.errors import InferError
        from infer.perplexity import read_text
        if output.is_dir():
            raise InferError(f"{output}: is a folder; give the output file name")
        if output.exists() and not force:
            raise InferError(f"{output}: already exists (use --force to overwrite)")
        if not output.parent.is_dir():
            raise InferError(f"{output}: folder {output.parent} does not exist")
        if not read_text(file):
            raise InferError(f"{file}: text is empty")

        def progress(done, total):
            typer.echo(f"[{done}/{total}] chunks")

        im = run(model, file, n_ctx=ctx, n_chunks=chunks, n_threads=threads, progress=progress)
        im.save(output)
        typer.echo(f"wrote {output}: {im.describe()}")
