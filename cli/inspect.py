"""`infer inspect MODEL`: metadata and a tensor/type table."""
from __future__ import annotations

from pathlib import Path

import typer


def _short(v, width=80):
    import numpy as np

    from infer.gguf_file import StringArray
    if isinstance(v, (list, np.ndarray, StringArray)):
        n = len(v)
        head = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in list(v[:5]))
        return f"[{head}{', ...' if n > 5 else ''}] ({n} items)"
    s = repr(v) if isinstance(v, str) else str(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= width else s[:width - 3] + "..."


def register(app: typer.Typer):
    @app.command("inspect")
    def inspect(model: Path = typer.Argument(..., help="GGUF model file."),
                tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="List the tensors.")):
        """Print a GGUF file's metadata and tensor table."""
        from collections import Counter

        from rich.console import Console
        from rich.table import Table

        from infer.gguf_file import GGUFFile
        con = Console()
        with GGUFFile(model) as gf:
            t = Table(title=f"{model} (GGUF v{gf.version}, {gf.size / 2**20:.1f} MiB)")
            t.add_column("key"); t.add_column("value", overflow="fold")
            for k, v in gf.metadata.items():
                t.add_row(k, _short(v))
            con.print(t)
            counts = Counter(ti.qtype.name for ti in gf.tensors.values())
            n_params = sum(ti.n_elements for ti in gf.tensors.values())
            con.print(f"{len(gf.tensors)} tensors, {n_params / 1e6:.1f} M parameters, types: "
                      + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
            if tensors:
                tt = Table()
                for c in ("name", "type", "shape", "MiB"):
                    tt.add_column(c)
                for ti in gf.tensors.values():
                    tt.add_row(ti.name, ti.qtype.name, "x".join(map(str, ti.shape)), f"{ti.nbytes / 2**20:.2f}")
                con.print(tt)
