"""Every bad input gives a one-line ConvertError naming the file, from the library and from the CLI
(`error: ...`, exit status 1), and leaves no output file behind."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import convert_fixtures as cf
from infer.convert import convert
from infer.errors import InferError


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def _set_header_len(path: Path, n: int) -> None:
    raw = path.read_bytes()
    path.write_bytes(n.to_bytes(8, "little") + raw[8:])


def _drop_tensor(d: Path, name: str) -> None:
    w = cf.load_weights(d)
    w.pop(name)
    cf.save_safetensors(d / "model.safetensors", w, "F32")


def _edit_json(path: Path, edit) -> None:
    j = json.loads(path.read_text())
    edit(j)
    path.write_text(json.dumps(j))


def _pickle_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")      # never unpickled; only the name is looked at
        z.writestr("archive/version", b"3")


ST = "model.safetensors"
CASES = {
    # name: (fixture, mutate(folder), message regex)
    "missing_config": ("qwen2", lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
    "invalid_config": ("qwen2", lambda d: (d / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
    "unknown_arch": ("qwen2", lambda d: _edit_json(d / "config.json", lambda j: j.update(architectures=["GPT2LMHeadModel"])),
                     r"unknown architecture 'GPT2LMHeadModel'"),
    "config_missing_key": ("qwen2", lambda d: _edit_json(d / "config.json", lambda j: j.pop("hidden_size")),
                           r"missing 'hidden_size'"),
    "missing_tensor": ("qwen2", lambda d: _drop_tensor(d, "model.layers.1.mlp.up_proj.weight"),
                       r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "missing_bias": ("qwen2", lambda d: _drop_tensor(d, "model.layers.0.self_attn.k_proj.bias"),
                     r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias'"),
    "bad_local_rope_base": ("qwen2", lambda d: _edit_json(d / "config.json", lambda j: j.update(rope_local_base_freq=-1)),
                            r"rope_local_base_freq must be a positive number, not -1"),
    "shape_mismatch": ("qwen2", lambda d: _edit_json(d / "config.json", lambda j: j.update(intermediate_size=128)),
                       r"has shape \[64, 96\] but config\.json implies \[64, 128\]"),
    "unexpected_tensor": ("qwen2", lambda d: _rewrite_header(d / ST, lambda h: h.update(
        {"model.layers.0.mlp.extra.weight": dict(h["model.norm.weight"])})), r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"),
    "header_larger_than_file": ("qwen2", lambda d: _set_header_len(d / ST, (d / ST).stat().st_size),
                                r"header of \d+ bytes is larger than the file"),
    "header_over_100mb": ("qwen2", lambda d: _set_header_len(d / ST, 200 * 1024 * 1024), r"over the 100 MB limit"),
    "header_not_json": ("qwen2", lambda d: (d / ST).write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64),
                        r"header is not valid JSON"),
    "offsets_out_of_range": ("qwen2", lambda d: _rewrite_header(d / ST, lambda h: h["model.norm.weight"].update(
        data_offsets=[10 ** 9, 10 ** 9 + 256])), r"'model\.norm\.weight': data offsets \[\d+, \d+\] out of range"),
    "offsets_not_shape": ("qwen2", lambda d: _rewrite_header(d / ST, lambda h: h["model.norm.weight"].update(shape=[32])),
                          r"'model\.norm\.weight': data offsets span 256 bytes but shape \[32\] x F32 needs 128"),
    "unknown_dtype": ("qwen2", lambda d: _rewrite_header(d / ST, lambda h: h["model.norm.weight"].update(dtype="F17")),
                      r"'model\.norm\.weight': unknown dtype 'F17'"),
    "unsupported_dtype": ("qwen2", lambda d: _rewrite_header(d / ST, lambda h: h["model.norm.weight"].update(dtype="I32")),
                          r"'model\.norm\.weight' has dtype I32; only F32, F16, BF16"),
    "index_missing_shard": ("llama_bpe", lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
                            r"names shard 'model-00002-of-00002\.safetensors', which is missing"),
    "index_outside_folder": ("llama_bpe", lambda d: (
        shutil.copy(d / "model-00002-of-00002.safetensors", d.parent / "evil.safetensors"),
        _edit_json(d / "model.safetensors.index.json", lambda j: j["weight_map"].update(
            {k: "../evil.safetensors" for k, v in j["weight_map"].items() if v.startswith("model-00002")}))),
        r"shard '\.\./evil\.safetensors' is a path outside the model folder"),
    "index_absolute_path": ("llama_bpe", lambda d: _edit_json(d / "model.safetensors.index.json", lambda j: j["weight_map"].update(
        {k: "/etc/passwd" for k in list(j["weight_map"])[:1]})), r"shard '/etc/passwd' is a path outside"),
    "index_not_json": ("llama_bpe", lambda d: (d / "model.safetensors.index.json").write_text("[1,"),
                       r"model\.safetensors\.index\.json: not valid JSON"),
    "index_tensor_not_in_shard": ("llama_bpe", lambda d: _edit_json(d / "model.safetensors.index.json", lambda j: j["weight_map"].update(
        {"model.norm.weight": "model-00001-of-00002.safetensors" if j["weight_map"]["model.norm.weight"].startswith("model-00002")
         else "model-00002-of-00002.safetensors"})), r"index names tensor 'model\.norm\.weight' in this shard but it is not there"),
    "missing_tokenizer": ("qwen2", lambda d: (d / "tokenizer.json").unlink(), r"missing tokenizer"),
    "bad_sentencepiece": ("llama_spm", lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 10),
                          r"tokenizer\.model: not a SentencePiece model"),
    "pickle_only": ("qwen2", lambda d: ((d / ST).unlink(), _pickle_zip(d / "pytorch_model.bin")),
                    r"only pickle checkpoints found \(pytorch_model\.bin\).*never unpickles.*safetensors"),
    "pickle_disguised": ("qwen2", lambda d: _pickle_zip(d / ST),
                         r"is a zip archive holding data\.pkl.*never unpickles"),
    "empty_folder": ("qwen2", lambda d: [p.unlink() for p in d.iterdir() if p.name != "config.json"],
                     r"no model\.safetensors"),
    "truncated_file": ("qwen2", lambda d: (d / ST).write_bytes((d / ST).read_bytes()[:-512]),
                       r"data offsets \[\d+, \d+\] out of range"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One broken copy of a fixture per case, each with its own (empty) output folder."""
    root = tmp_path_factory.mktemp("bad")
    base = {name: make(root / "_base" / name) for name, make in cf.MAKERS.items()}
    out = {}
    for case, (fx, mutate, _) in CASES.items():
        d = root / case / "model"
        shutil.copytree(base[fx], d)
        mutate(d)
        (root / case / "out").mkdir()
        out[case] = d
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_library_error(bad_inputs, case):
    d = bad_inputs[case]
    out = d.parent / "out" / "m.gguf"
    with pytest.raises(InferError, match=CASES[case][2]) as e:
        convert(d, out, "q8_0")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    assert str(d) in msg or str(d.parent) in msg or "model" in msg      # names the file or folder
    assert list(out.parent.iterdir()) == []
    with pytest.raises(InferError, match=CASES[case][2]):              # the dry run validates the same way
        convert(d, None, "q8_0", dry_run=True)


DRIVER = r"""
import sys
from infer.cli import main as m
m._register(); m._register = lambda: None
args = sys.argv[1:]
if len(m.app.registered_commands) == 1 and m.app.registered_callback is None:
    args = args[1:]      # typer runs a lone command without its name
m.main(args)
"""


@pytest.fixture(scope="module")
def cli_results(bad_inputs):
    """Run `infer convert BAD -o OUT` for every case at once (subprocesses in parallel)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    procs = {}
    for case, d in bad_inputs.items():
        out = d.parent / "out" / "cli.gguf"
        procs[case] = subprocess.Popen([sys.executable, "-c", DRIVER, "convert", str(d), "-o", str(out), "--type", "q4_0"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return {case: (p.wait(timeout=120), *p.communicate()) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error(bad_inputs, cli_results, case):
    rc, out, err = cli_results[case]
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    import re
    assert re.search(CASES[case][2], lines[0]), lines[0]
    assert list((bad_inputs[case].parent / "out").iterdir()) == []


def test_cli_converts_and_refuses_overwrite(tmp_path):
    d = cf.make_qwen2(tmp_path / "qwen2")
    out = tmp_path / "o.gguf"
    run = lambda *a: subprocess.run([sys.executable, "-c", DRIVER, "convert", str(d), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("-o", str(out), "--type", "q4_1_mixed")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.stat().st_size > 0 and r.stderr == ""   # no progress bar off a tty
    r = run("-o", str(out))
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run("--dry-run")
    assert r.returncode == 0 and "expected file size" in r.stdout and "blk.1.attn_v.bias" in r.stdout
    r = run("-o", str(tmp_path / "new.gguf"), "--type", "q3_k")
    assert r.returncode == 1 and "unknown type 'q3_k'" in r.stderr
