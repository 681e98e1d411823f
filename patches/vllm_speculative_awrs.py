"""AWRS beside speculative decoding (``plugins/vllm/awrs_speculative.py``): after the model runner samples,
constrained rows get AWRS's tokens, verified against the drafts."""

from afterburner.patches.base import Patch

SPECULATIVE_AWRS = Patch(
    name="vllm.speculative_awrs",
    target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample",
    verified_on=">=0.32.0,<0.33",  # private runner internals: verified on the tested release only
    when="after",  # hook(sampler_output, runner, logits, spec_decode_metadata)
    expects_params=("self", "logits", "spec_decode_metadata"),
)
