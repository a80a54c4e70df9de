"""`infer inspect MODEL`: metadata and a tensor/type table, then the checks `infer generate` runs.

A file that `generate` would refuse is shown as far as it can be read, and the problem ends the
output as the other commands end theirs: one line "error: ..." on stderr, exit status 1.
"""
from __future__ import annotations

from pathlib import Path

import typer


def _short(v, width=80):
    import numpy as np

    from infer.gguf_file import StringArray
    if isinstance(v, (list, np.ndarray, StringArray)):
        n = len(v)
        head = ", ".join(repr(x) if isinstance(x, str) else _short(x, 20) for x in list(v[:5]))
        return f"[{head}{', ...' if n > 5 else ''}] ({n} items)"
    s = repr(v) if isinstance(v, str) else str(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= width else s[:width - 3] + "..."


def _metadata_table(title, metadata):
    from rich.table import Table
    from rich.text import Text
    t = Table(title=Text(title))
    t.add_column("key"); t.add_column("value", overflow="fold")
    for k, v in metadata.items():
        t.add_row(Text(repr(k)[1:-1] if not k.isprintable() else k), Text(_short(v)))  # never rich markup
    return t


def register(app: typer.Typer):
    @app.command("inspect")
    def inspect(model: Path = typer.Argument(..., help="GGUF model file."),
                tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="List the tensors.")):
        """Print a GGUF file's metadata and tensor table; exit 1 if `generate` would refuse it."""
        from collections import Counter

        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from infer.errors import InferError
        from infer.gguf_file import GGUFFile
        con = Console()
        try:
            gf = GGUFFile(model)
        except InferError as e:
            part = getattr(e, "partial", None)
            if part is not None and part.version is not None:
                con.print(_metadata_table(f"{model} (GGUF v{part.version}, {part.size / 2**20:.1f} MiB; "
                                          f"read up to the problem)", part.metadata))
                if part.n_tensors_declared is not None:
                    con.print(Text(f"{part.n_tensors_declared} tensors declared"))
            raise
        with gf:
            con.print(_metadata_table(f"{model} (GGUF v{gf.version}, {gf.size / 2**20:.1f} MiB)", gf.metadata))
            counts = Counter(ti.qtype.name for ti in gf.tensors.values())
            n_params = sum(ti.n_elements for ti in gf.tensors.values())
            con.print(Text(f"{len(gf.tensors)} tensors, {n_params / 1e6:.1f} M parameters, types: "
                           + ", ".join(f"{k} x{v}" for k, v in counts.most_common())))
            if tensors:
                tt = Table()
                for c in ("name", "type", "shape", "MiB"):
                    tt.add_column(c)
                for ti in gf.tensors.values():
                    tt.add_row(Text(ti.name), ti.qtype.name, "x".join(map(str, ti.shape)), f"{ti.nbytes / 2**20:.2f}")
                con.print(tt)
            from infer.api import open_model
            open_model(gf)          # the checks `infer generate` runs
