"""`infer bench MODEL... [-p 512] [-n 128] [-r 5] [-t 1,2] [-o md|json]`: llama-bench's table for infer.

Prefill (ppP) and decode (tgN) tokens/s, mean ± stdev over -r runs after a warm-up, per thread
count, with time to first token, decode GB/s (weights read per token x tokens/s), peak RSS, model
size, parameters and file type. -p, -n and -t take comma-separated lists, like llama-bench's.
The method is described in infer/bench.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer


def _ints(opt: str, text: str, allow_zero: bool = False, single: bool = False) -> list[int]:
    from infer.errors import InferError
    out = []
    parts = str(text).split(",")
    want = "non-negative" if allow_zero else "positive"
    if single and len(parts) != 1:
        raise InferError(f"{opt}: expected one {want} integer, got {text!r}")
    for part in parts:
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            v = None
        if v is None or v < 0 or (v == 0 and not allow_zero):
            what = f"one {want} integer" if single else f"comma-separated {want} integers"
            raise InferError(f"{opt}: expected {what}, got {text!r}")
        out.append(v)
    return out


def register(app: typer.Typer):
    @app.command("bench")
    def bench(
        models: List[Path] = typer.Argument(..., help="GGUF model file(s)."),
        n_prompt: str = typer.Option("512", "-p", "--n-prompt", metavar="N[,N...]",
                                     help="Prompt lengths for the prefill test (0: skip it)."),
        n_gen: str = typer.Option("128", "-n", "--n-gen", metavar="N[,N...]",
                                  help="Tokens for the decode test (0: skip it)."),
        reps: str = typer.Option("5", "-r", "--repetitions", metavar="N", help="Measured runs per test."),
        threads: Optional[str] = typer.Option(None, "-t", "--threads", envvar="INFER_THREADS", metavar="N[,N...]",
                                              help="Thread counts (default: physical cores)."),
        output: str = typer.Option("md", "-o", "--output", metavar="md|json", help="Output format."),
        batch: str = typer.Option("512", "-b", "--batch-size", metavar="N", help="Prefill chunk (n_batch)."),
        membw: bool = typer.Option(False, "--membw", help="Also measure the machine's read bandwidth "
                                   "(1 GB array) and show decode GB/s as a share of it."),
        warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Run each test once before measuring."),
    ):
        """Measure prefill and decode speed (tokens/s), TTFT and memory, like llama-bench."""
        from infer.errors import InferError
        fmt = output.lower()
        if fmt not in ("md", "json"):
            raise InferError(f"-o: expected md or json, got {output!r}")
        ps = _ints("-p", n_prompt, allow_zero=True)
        ns = _ints("-n", n_gen, allow_zero=True)
        (r,) = _ints("-r", reps, single=True)
        (b,) = _ints("-b", batch, single=True)
        if not any(ps) and not any(ns):
            raise InferError("nothing to measure: -p and -n are both 0")
        for m in models:
            if not m.is_file():
                raise InferError(f"{m}: no such file")

        from infer import bench as B
        if threads is None:
            from infer.api import default_threads
            ts = [min(default_threads(), B.max_threads())]
        else:
            ts = _ints("-t", threads)
        B.check_threads(ts)

        tty = sys.stderr.isatty()

        def progress(msg):
            if tty:
                sys.stderr.write(f"\r\x1b[K{msg}")
                sys.stderr.flush()

        # llama-bench's plan: one pp test per -p value and one tg test per -n value
        plans = [(ps[0], ns[0])] if len(ps) == 1 and len(ns) == 1 else \
            [(p, 0) for p in ps if p] + [(0, n) for n in ns if n]
        rows = []
        for m in models:
            for p, n in plans:
                if p or n:
                    rows += B.run_bench(m, ts, p, n, r, n_batch=b, warmup=warmup, progress=progress)
        bw = None
        if membw:           # after the runs: its 1 GB array must not count in their peak RSS
            progress("measuring read bandwidth")
            bw = B.measure_read_bandwidth(ts)
        if tty:
            sys.stderr.write("\r\x1b[K")
        order = {t: i for i, t in enumerate(ts)}
        rows.sort(key=lambda x: (models.index(Path(x["model_filename"])) if Path(x["model_filename"]) in models else 0,
                                 order.get(x["n_threads"], 0), x["n_gen"] > 0, x["n_prompt"], x["n_gen"]))
        if bw:
            for x in rows:
                gb = bw.get(x["n_threads"])
                if gb:
                    x["read_bandwidth_gbps"] = gb
                    if "decode_gbps" in x:
                        x["decode_bw_fraction"] = x["decode_gbps"] / gb
        if any(x.get("threading_layer") == "workqueue" for x in rows) and max(ts) > 1:
            print("warning: Numba's threading layer is 'workqueue' (no OpenMP or TBB found): multi-thread "
                  "figures suffer; install tbb (pip install tbb) or use a Numba build with OpenMP",
                  file=sys.stderr)
        if fmt == "json":
            import json
            typer.echo(json.dumps(rows, indent=2))
        else:
            typer.echo(B.to_markdown(rows, bw and {t: v for t, v in bw.items() if isinstance(t, int)}))
