"""AWRS beside speculative decoding (``plugins/vllm/awrs_speculative.py``): after the model runner samples,
constrained rows get AWRS's tokens, verified against the drafts; before the scheduler takes the next
step's drafts, constrained chains are cut at their first forbidden draft."""

from afterburner.patches.base import Patch

SPECULATIVE_AWRS = Patch(
    name="vllm.speculative_awrs",
    target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample",
    verified_on=">=0.32.0,<0.33",  # private runner internals: verified on the tested release only
    when="after",  # hook(sampler_output, runner, logits, spec_decode_metadata)
    expects_params=("self", "logits", "spec_decode_metadata"),
)

SPECULATIVE_AWRS_DRAFTS = Patch(
    name="vllm.speculative_awrs_drafts",
    target="vllm.v1.worker.gpu_model_runner:GPUModelRunner.take_draft_token_ids",
    verified_on=">=0.32.0,<0.33",
    when="after",  # hook(draft_token_ids, runner): cut in place
    expects_params=("self",),
)
