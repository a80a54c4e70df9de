"""`infer bench` and the bench/ tools: output shape and fields, errors on bad arguments, the
synthetic-model writer. No timing is asserted (figures depend on the machine)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infer import bench as B
from infer.errors import InferError

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=64, n_layers=2, n_ff=128, n_heads=4, n_kv_heads=2, head_dim=16, n_ctx=256)


def run_cli(*args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NUMBA_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "infer.cli", "bench", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def synth(tmp_path_factory, smollm2_path):
    """A tiny model from bench/make_synthetic.py (separate output.weight, like the 1.1B one)."""
    d = tmp_path_factory.mktemp("synth")
    ms = load_script("make_synthetic")
    q8, q4 = ms.write_files(d, ["q8_0", "q4_0"], shapes=TINY, prefix="tiny", vocab_file=smollm2_path,
                            log=lambda *_: None)
    return q8, q4


def test_make_synthetic(synth, smollm2_path):
    import infer
    from infer.gguf_file import GGUFFile
    q8, q4 = synth
    with GGUFFile(q8) as gf, GGUFFile(q4) as g4, GGUFFile(smollm2_path) as ref:
        assert gf.metadata["llama.embedding_length"] == 64 and gf.metadata["general.file_type"] == 7
        assert g4.metadata["general.file_type"] == 2
        for k, v in ref.metadata.items():          # the vocabulary and tokenizer keys copied as they are
            if k.startswith("tokenizer."):
                got = gf.metadata[k]
                assert (list(got) == list(v)) if hasattr(v, "__len__") and not isinstance(v, str) else got == v, k
        assert gf.tensors["output.weight"].qtype.name == "Q8_0"
        assert g4.tensors["blk.1.ffn_down.weight"].qtype.name == "Q4_0"
        assert gf.tensors["blk.0.attn_norm.weight"].qtype.name == "F32"
    with infer.LLM(q4, n_ctx=64, n_threads=1) as llm:
        c = llm.generate("Hello", max_tokens=3, sampling=infer.SamplingParams(temperature=0))
        assert len(c.tokens) >= 1


def test_model_info(synth, smollm2_path):
    q8, _ = synth
    i = B.model_info(q8)
    assert not i.tied and i.file_type == "Q8_0" and i.n_vocab == 49152 and i.n_layers == 2
    from infer.gguf_file import GGUFFile
    with GGUFFile(q8) as gf:
        embd = gf.tensors["token_embd.weight"].nbytes
        assert i.bytes_per_token == i.weight_bytes - embd      # the embedding table is only gathered
        assert i.n_params == sum(t.n_elements for t in gf.tensors.values())
    s = B.model_info(smollm2_path)
    assert s.tied and s.bytes_per_token == s.weight_bytes      # tied: the table is the output head
    assert s.file_type == "Q4_1" and s.n_layers == 30 and s.file_size == os.path.getsize(smollm2_path)


def test_run_bench_library(synth):
    rows = B.run_bench(synth[0], threads=[1], n_prompt=8, n_gen=4, reps=2, n_batch=4)
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    pp, tg = rows
    for r in rows:
        assert r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 and r["n_threads"] == 1
        assert r["peak_rss_bytes"] > 0 and r["threading_layer"] != "unknown"
    assert pp["ttft_ms"] > 0 and "decode_gbps" not in pp
    assert tg["decode_gbps"] == pytest.approx(tg["weight_bytes_per_token"] * tg["avg_ts"] / 1e9)
    md = B.to_markdown(rows, {1: 10.0})
    assert md.splitlines()[0].startswith("| model | size | params | threads | test | t/s |")
    assert "% of read BW" in md and "| pp8 |" in md and "| tg4 |" in md


def test_bench_cli_json_and_markdown(smollm2_path, synth):
    pj = run_cli(smollm2_path, "-p", "8", "-n", "4", "-r", "2", "-t", "1", "-o", "json")
    pm = run_cli(synth[1], "-p", "4,8", "-n", "2", "-r", "1", "-t", "1")
    out, err = pj.communicate(timeout=600)
    assert pj.returncode == 0, err
    rows = json.loads(out)
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    want = {"model_filename", "model_type", "model_size", "model_n_params", "file_type", "n_threads", "n_prompt",
            "n_gen", "avg_ts", "stddev_ts", "samples_ts", "peak_rss_bytes", "threading_layer", "numba_version"}
    for r in rows:
        assert want <= set(r), want - set(r)
        assert r["model_size"] == os.path.getsize(smollm2_path) and r["file_type"] == "Q4_1"
        assert r["model_n_params"] > 100e6 and len(r["samples_ts"]) == 2
    assert "ttft_ms" in rows[0] and "decode_gbps" in rows[1]
    out, err = pm.communicate(timeout=600)
    assert pm.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| model |") and lines[1].startswith("|---")
    tests = [ln.split("|")[5].strip() for ln in lines[2:] if ln.startswith("| ")]
    assert tests == ["pp4", "pp8", "tg2"]
    assert "threading layer" in out


BAD = {
    "zero threads": (["-t", "0"], "-t"),
    "too many threads": (["-t", "4096"], "Numba allows at most"),
    "threads not a number": (["-t", "two"], "-t"),
    "bad format": (["-o", "xml"], "-o"),
    "nothing to run": (["-p", "0", "-n", "0"], "nothing to measure"),
    "zero reps": (["-r", "0"], "-r"),
    "reps list": (["-r", "1,2"], "-r"),
    "negative prompt": (["-p", "-4"], "-p"),
    "bad batch": (["-b", "x"], "-b"),
}


def test_bench_cli_errors(smollm2_path, tmp_path):
    procs = {k: run_cli(smollm2_path, *a) for k, (a, _) in BAD.items()}
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("not a model\n" * 10)
    procs["missing file"] = run_cli(tmp_path / "nope.gguf", "-p", "4", "-n", "2", "-r", "1")
    procs["not gguf"] = run_cli(not_gguf, "-p", "4", "-n", "2", "-r", "1", "-t", "1")
    needles = {**{k: n for k, (_, n) in BAD.items()}, "missing file": "no such file", "not gguf": "not a GGUF file"}
    for k, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 1, (k, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (k, err)
        assert needles[k] in lines[0], (k, lines[0])
        assert out == "", k


def test_read_bandwidth_small():
    bw = B.measure_read_bandwidth([1], size_mb=16, repeats=1)
    assert bw[1] > 0 and bw["numpy"] > 0
    with pytest.raises(InferError, match="thread counts"):
        B.measure_read_bandwidth([0], size_mb=1)


def test_vs_llamacpp_argument_errors():
    """The side-by-side script's own argument checks (the run itself is for a quiet machine)."""
    script = str(ROOT / "bench" / "vs_llamacpp.py")
    for args, needle in ((["--threads", "0"], "--threads"), (["--pp", "0", "--tg", "0"], "--pp"),
                         (["--model", "/nonexistent.gguf"], "no such file")):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        if "cannot import llama_cpp" in r.stderr:
            pytest.skip("llama-cpp-python is not installed in this interpreter")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and needle in r.stderr, (args, r.stderr)
