"""Tree speculation behind vLLM's ``--speculative-config`` (see ``afterburner.plugins.vllm.tree_speculation``):
the startup check of an afterburner proposer's config, then the four points of vLLM's model runner where
afterburner's proposer, tree positions, acceptance and KV bookkeeping come in. Each runner hook does
nothing unless the runner's drafter is afterburner's."""

from afterburner.patches.base import Patch

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_VERIFIED = ">=0.32.0,<0.33"  # private runner internals: verified on the tested release only

SPEC_CONFIG = Patch(
    name="vllm.spec_config",
    target="vllm.engine.arg_utils:EngineArgs.create_speculative_config",
    verified_on=_VERIFIED,
    when="before",  # in the user's process, before vLLM reads the proposer's folder
    expects_params=("self", "target_model_config", "target_parallel_config"),
)
TREE_PROPOSER = Patch(
    name="vllm.tree_proposer",
    target=f"{_RUNNER}.__init__",
    verified_on=_VERIFIED,
    when="after",
    expects_params=("self", "vllm_config", "device"),
)
TREE_POSITIONS = Patch(
    name="vllm.tree_positions",
    target=f"{_RUNNER}._prepare_inputs",
    verified_on=_VERIFIED,
    when="after",
    expects_params=("self", "scheduler_output", "num_scheduled_tokens"),
)
TREE_ACCEPTANCE = Patch(
    name="vllm.tree_acceptance",
    target="vllm.v1.sample.rejection_sampler:RejectionSampler.forward",
    verified_on=_VERIFIED,
    when="after",
    expects_params=("self", "metadata", "draft_probs", "logits", "sampling_metadata"),
)
TREE_BOOKKEEPING = Patch(
    name="vllm.tree_bookkeeping",
    target=f"{_RUNNER}.propose_draft_token_ids",
    verified_on=_VERIFIED,
    when="before",
    expects_params=("self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
                    "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata",
                    "common_attn_metadata"),
)
TREE_SPECULATION_PATCHES = (SPEC_CONFIG, TREE_PROPOSER, TREE_POSITIONS, TREE_ACCEPTANCE, TREE_BOOKKEEPING)
