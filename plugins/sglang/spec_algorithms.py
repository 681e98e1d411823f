"""afterburner's tree speculation as SGLang (0.5.23) speculative algorithms, generic over the proposers in
``proposers.PROPOSERS`` (Medusa: ``medusa.py``; the micro-step drafter: ``hamburger.py``; a draft model:
``draft_model.py``).

How SGLang's speculative framework is used (read from its 0.5.23 source):
- ``SpeculativeAlgorithm.register(name, supports_overlap=, validate_server_args=, spec_class=)`` files a
  ``CustomSpecAlgo`` under ``name``; ``--speculative-algorithm`` takes any string and ``from_string``
  resolves it there. While resolving arguments (``handle_speculative_decoding``, the user's process,
  before any subprocess) SGLang runs ``validate_server_args`` and then the spec class's
  ``handle_server_args`` on a recorder of the ServerArgs (writes become declared overrides). The scheduler
  calls ``create_worker(server_args)`` -> a worker class, builds it with ``(server_args, gpu_id,
  nccl_port, target_worker)`` and, overlap off, calls ``forward_batch_generation(batch)`` once per step.
- afterburner's proposers have the shape of SGLang's NGRAM: no draft KV; one TARGET_VERIFY pass of the
  target over a token tree with a tree mask (``NgramVerifyInput``); SGLang's ``eagle_sample`` accepts
  (greedy tree walk at temperature 0, tree speculative sampling above);
  ``move_accept_tokens_to_target_kvcache`` moves the accepted nodes' KV to the front of the verify
  window, whose slots the scheduler reserved (``eagle_prepare_for_decode``) and frees. Only the drafter
  differs (``proposers.PROPOSERS``): it reads the target's hidden state at the last accepted token
  (``CaptureHiddenMode`` LAST at prefill, FULL at verify; the final layer's, or the layers a drafter asks
  SGLang's EAGLE-3 capture for) and its top-k fill the tree (``tree_verify``, ``tree_spec_worker``).
- CPU: SGLang's verify forward (TARGET_VERIFY) has a CPU path in ``intel_amx`` (an AMX CPU) only;
  ``torch_native.forward_extend`` reads ``extend_prefix_lens``, unset in that mode, and attends causally. So
  on ``torch_native`` the worker hands the target's backend afterburner's tree attention for verify steps
  (``verify_attention``); other CPU backends are refused at startup. SGLang's CPU verify is greedy whatever
  the temperature (``eagle_sample``): batches with sampled requests are verified by afterburner
  (``sampled_verify``). The index ops around the verify (``verify_tree_greedy_cpu``,
  ``assign_extend_cache_locs_cpu``, ``fill_accept_out_cache_loc_cpu``, ``copy_all_layer_kv_cache_cpu``) come
  from sgl_kernel's CPU build, or here from the tests' shim (README, Speculation in SGLang).
- CUDA: decode CUDA graphs are turned off (SGLang captures verify graphs for its own algorithms only).

``speculative.acceptance: "typical"`` is refused: SGLang's verify implements lossless acceptance only.
"""

from __future__ import annotations

import functools
from typing import Any

from afterburner.plugins.config import ConfigError, from_env
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang import proposers
from afterburner.plugins.sglang.spec_checks import attention_backends, attention_blocker, cpu_blocker, proposer_tree

logger = get_logger(__name__)


def tree_for(server_args: Any, config=None):
    """The tree this server verifies (``spec_checks.proposer_tree``), or ``ConfigError``."""
    return proposer_tree(server_args, server_args.speculative_num_draft_tokens, config or from_env())


def validate_server_args(server_args: Any) -> None:
    """SGLang's ``validate_server_args`` hook (argument resolution, the user's process): one
    ``ConfigError`` line for whatever would fail later in the scheduler."""
    name = proposers.canonical(server_args.speculative_algorithm)
    config = from_env()
    if not config.enabled:  # no stock algorithm to fall back to
        raise ConfigError(f"afterburner.enabled: false, but --speculative-algorithm {name} is afterburner's; "
                          "drop the flag or enable afterburner")
    shape = proposers.PROPOSERS[name].tree
    if shape and "tree" in config.speculative.model_fields_set and config.speculative.tree != shape:
        raise ConfigError(f"afterburner.speculative.tree: --speculative-algorithm {name} drafts a {shape}; leave "
                          f"tree unset or {shape!r}")
    tree_for(server_args, config)
    if config.speculative.acceptance != "lossless":
        raise ConfigError(f"afterburner.speculative.acceptance: {config.speculative.acceptance!r} is not "
                          "available on SGLang (its tree verify is lossless only); use 'lossless'")
    if server_args.speculative_use_rejection_sampling:
        raise ConfigError(f"--speculative-use-rejection-sampling: {name} drafts have no proposal "
                          "distribution; leave it off (temperature > 0 already verifies losslessly)")
    problem = (attention_blocker(name, *attention_backends(server_args))
               or cpu_blocker(name, server_args.device, *attention_backends(server_args)))
    if problem:
        raise ConfigError(problem)


def handle_server_args(server_args: Any) -> None:
    """SGLang's per-algorithm defaults (runs after ``validate_server_args``)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    tree = tree_for(server_args)
    server_args.speculative_num_draft_tokens = tree.num_nodes
    # KV reserved per request and step: max(steps * topk, num_draft_tokens) = the tree.
    server_args.speculative_num_steps = tree.depth
    server_args.speculative_eagle_topk = 1
    server_args.disable_overlap_schedule = True  # the worker runs synchronously (supports_overlap=False)
    server_args.enable_mixed_chunk = False  # a mixed step would decode running requests without their tree
    # SGLang captures TARGET_VERIFY graphs only for its own algorithms (get_spec_info -> None for ours).
    server_args.cuda_graph_config = with_phase(server_args.cuda_graph_config, Phase.DECODE,
                                               backend=Backend.DISABLED)
    module = proposers.proposer_module(server_args.speculative_algorithm)
    if hasattr(module, "handle_server_args"):
        module.handle_server_args(server_args)


def _create_worker(_server_args: Any) -> type:
    """SGLang's worker factory (the scheduler calls it); the worker module imports SGLang's verify path."""
    from afterburner.plugins.sglang.tree_spec_worker import TreeSpecWorker

    return TreeSpecWorker


@functools.cache
def _spec_class() -> type:
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class TreeSpecAlgo(CustomSpecAlgo):
        """SGLang's algorithm interface for afterburner's proposers: no draft KV, hidden states or top-k
        draft in SGLang's sense."""

        def handle_server_args(self, server_args: Any) -> None:
            handle_server_args(server_args)

        def has_draft_kv(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def carries_draft_hidden_states(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            # The scheduler builds one for every algorithm; CustomSpecAlgo (0.5.23) lacks the method.
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

    return TreeSpecAlgo


def register_algorithms() -> list[str]:
    """Idempotent (SGLang loads plugins more than once per process). Returns what it registered; a name
    SGLang reserves or another plugin holds is left to them, with one warning."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec
    from transformers import AutoConfig

    registered = []
    for canonical, entry in proposers.PROPOSERS.items():
        module = proposers.proposer_module(canonical)
        if hasattr(module, "FOLDER_CONFIG"):
            try:
                AutoConfig.register(module.FOLDER_CONFIG.model_type, module.FOLDER_CONFIG)
            except ValueError:  # already registered, by an earlier call or someone else: theirs reads it too
                pass
        for name in (canonical, *entry.aliases):
            existing = get_spec(name)
            if existing is None or existing.factory is not _create_worker:
                try:
                    SpeculativeAlgorithm.register(name, supports_overlap=False, spec_class=_spec_class(),
                                                  validate_server_args=validate_server_args)(_create_worker)
                except ValueError as exc:
                    logger.warning("afterburner: --speculative-algorithm %s left as it is (%s); use %s",
                                   name, exc, canonical)
                    continue
            registered.append(f"speculative algorithm {name}")
    return registered
