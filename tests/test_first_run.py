"""A first run with an empty kernel cache: the library logs that it compiles, compiles the decode
step in a second process (kernels/warmup.py), answers right, and marks the cache warm; the CLI
says so on stderr before anything else, and not once the cache is warm."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import smollm2_file

NOTICE = "compiling kernels for this CPU, once: about"


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "INFER_WARMUP_CHILD"}
    env["NUMBA_CACHE_DIR"] = str(cache)
    return env


def test_first_run_compiles_in_two_processes_and_says_so(tmp_path):
    model = smollm2_file()
    cache = tmp_path / "kernels"
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
        import infer
        with infer.LLM({str(model)!r}, n_ctx=256, n_threads=2) as llm:
            assert llm.cold_start and llm._background is not None and llm._background.running()
            # one token: no decode step runs here, so the marker waits for the second process,
            # which close() waits for (killed, it would leave the next run to compile again)
            r = llm.generate("The capital of France is", max_tokens=1, sampling=infer.SamplingParams.greedy())
            print(repr(r.text), dict(llm.model.routes), llm.cold_start)
        print("warm after close:", not llm.cold_start)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LOG " + NOTICE in p.stderr
    assert "decode kernels compiled in a second process" in p.stderr, p.stderr[-2000:]
    assert "Paris" in p.stdout, p.stdout
    # the prompt's logits came from numpy while the second process compiled the matvecs
    assert "'numpy': 1" in p.stdout and "True\nwarm after close: True" in p.stdout, p.stdout
    assert "finishing the kernel compilation" in p.stderr
    markers = list(cache.glob("compiled-*"))
    assert len(markers) == 1

    # warm: no notice, no second process, and nothing left to compile (the cache is whole: the
    # decode step and the prompt's logits matvec came from the second process)
    def files():
        return sorted((f.name, f.stat().st_mtime_ns) for f in cache.rglob("*") if f.is_file())
    before = files()
    cli = [sys.executable, "-m", "infer.cli.main", "generate", str(model), "-p", "The capital of France is",
           "-n", "4", "--temp", "0"]
    p = subprocess.run(cli, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert NOTICE not in p.stderr and "finishing" not in p.stderr and "Paris" in p.stdout
    assert files() == before

    # the marker gone (a new CPU target would have none): the CLI's first line says so; the
    # kernels themselves are cached, so the second process only loads them
    markers[0].unlink()
    p = subprocess.run(cli, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.splitlines()[0].startswith(NOTICE), p.stderr
    assert "Paris" in p.stdout and "Traceback" not in p.stderr
    assert len(list(cache.glob("compiled-*"))) == 1
