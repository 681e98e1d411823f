"""Medusa as an SGLang (0.5.23) speculative algorithm:

    --speculative-algorithm AFTERBURNER_MEDUSA (or MEDUSA)  --speculative-draft-model-path HEADS_FOLDER
    [--speculative-num-draft-tokens N]    N tokens verified per request: the root + N - 1 tree nodes
                                          (default: one node per head)
    AFTERBURNER_CONFIG='{"medusa": {"tree": "paper" | "chain" | [[0], [1], [0, 0], ...]}}'

How SGLang's speculative framework is used (read from its 0.5.23 source):
- ``SpeculativeAlgorithm.register(name, supports_overlap=, validate_server_args=, spec_class=)`` files a
  ``CustomSpecAlgo`` under ``name``; ``--speculative-algorithm`` takes any string and ``from_string``
  resolves it there. While resolving arguments (``handle_speculative_decoding``, the user's process,
  before any subprocess) SGLang runs ``validate_server_args`` and then the spec class's
  ``handle_server_args`` on a recorder of the ServerArgs (writes become declared overrides). The scheduler
  calls ``create_worker(server_args)`` -> a worker class, builds it with ``(server_args, gpu_id,
  nccl_port, target_worker)`` and, overlap off, calls ``forward_batch_generation(batch)`` once per step.
- Medusa has the shape of SGLang's NGRAM: no draft model and no draft KV; one TARGET_VERIFY pass of the
  target over a token tree with a tree mask (``NgramVerifyInput``); SGLang's ``eagle_sample`` accepts
  (greedy tree walk at temperature 0, tree speculative sampling above);
  ``move_accept_tokens_to_target_kvcache`` moves the accepted nodes' KV to the front of the verify
  window, whose slots the scheduler reserved (``eagle_prepare_for_decode``) and frees. Only the drafter
  differs: the heads read the target's hidden state at the last accepted token (``CaptureHiddenMode``
  LAST at prefill, FULL at verify) and their top-k fill the tree (``medusa_draft``, ``medusa_worker``).
- SGLang reads the draft path's config.json with transformers' ``AutoConfig`` for every algorithm, before
  any validator: ``MedusaHeadsConfig`` registers the ``medusa`` model type of afterburner's/vLLM's folders.
  (A FasterDecoding folder whose config.json has no ``model_type`` fails there, in SGLang.)
- CPU: SGLang's verify runs on CPU only through sgl_kernel's CPU build (``verify_tree_greedy_cpu``,
  ``assign_extend_cache_locs_cpu``, ``fill_accept_out_cache_loc_cpu``) and the ``intel_amx`` attention
  backend, the only CPU backend with a TARGET_VERIFY path (``torch_native.forward_extend`` reads
  ``extend_prefix_lens``, which SGLang leaves unset in that mode). Anything else is refused at startup.
- CUDA: decode CUDA graphs are turned off (SGLang captures verify graphs for its own algorithms only).

``acceptance: "typical"`` is refused: SGLang's verify implements lossless acceptance only.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from afterburner.plugins.config import AfterburnerConfig, ConfigError, from_env
from afterburner.plugins.log import get_logger
from afterburner.spec_decode.medusa.checkpoint import CheckpointError, load_heads
from afterburner.spec_decode.medusa.choices import tree_paths
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads
from afterburner.spec_decode.medusa.tree import MedusaTree, build_tree

logger = get_logger(__name__)

NAME = "AFTERBURNER_MEDUSA"
ALIAS = "MEDUSA"  # not an SGLang name in 0.5.23
CPU_VERIFY_BACKEND = "intel_amx"


def read_heads(draft_path: str | None) -> MedusaHeads:
    """The heads in ``--speculative-draft-model-path``, or one ``ConfigError`` line."""
    if not draft_path:
        raise ConfigError(f"--speculative-algorithm {NAME} needs --speculative-draft-model-path: the Medusa "
                          "heads folder (build one with `afterburner train medusa`)")
    try:
        return load_heads(draft_path)
    except CheckpointError as exc:
        raise ConfigError(f"--speculative-draft-model-path: {exc}") from None


@functools.lru_cache(maxsize=8)
def _heads_config(draft_path: str | None) -> HeadsConfig:
    return read_heads(draft_path).config  # argument checks read the folder once, and keep no weights


def make_tree(heads: HeadsConfig, num_draft_tokens: int | None, config: AfterburnerConfig) -> MedusaTree:
    """The tree of ``config.medusa.tree`` with ``num_draft_tokens`` nodes, the root included (default: one
    node per head), or one ``ConfigError`` line naming the flag or field that does not fit the heads."""
    drafts = heads.num_heads if num_draft_tokens is None else num_draft_tokens - 1
    if drafts < 1:
        raise ConfigError(f"--speculative-num-draft-tokens: {num_draft_tokens} leaves no tree node to draft; "
                          "give at least 2 (the root and one node)")
    try:
        paths = tree_paths(config.medusa.tree, num_heads=heads.num_heads, num_drafts=drafts)
        return build_tree(paths, num_heads=heads.num_heads)
    except ValueError as exc:
        raise ConfigError(f"afterburner.medusa.tree: {exc} (on SGLang --speculative-num-draft-tokens "
                          f"{drafts + 1} = the root + {drafts} drafted nodes)") from None


def cpu_blocker(device: str, prefill_backend: str | None, decode_backend: str | None) -> str | None:
    """Why SGLang's tree verify cannot run with these settings (None: it can)."""
    if device != "cpu" or prefill_backend == decode_backend == CPU_VERIFY_BACKEND:
        return None
    used = "/".join(sorted({str(prefill_backend), str(decode_backend)}))
    return (f"--speculative-algorithm {NAME} on CPU needs --attention-backend {CPU_VERIFY_BACKEND} (an AMX "
            f"CPU and sgl_kernel's CPU build): SGLang's tree verify has no path through {used} "
            "(TARGET_VERIFY attention, verify_tree_greedy_cpu, assign_extend_cache_locs_cpu)")


def attention_backends(server_args: Any) -> tuple[str | None, str | None]:
    """(prefill, decode) attention backends."""
    default = server_args.attention_backend
    return server_args.prefill_attention_backend or default, server_args.decode_attention_backend or default


def validate_server_args(server_args: Any) -> None:
    """SGLang's ``validate_server_args`` hook (argument resolution, the user's process): one
    ``ConfigError`` line for whatever would fail later in the scheduler."""
    config = from_env()
    if not config.enabled:  # no stock algorithm to fall back to
        raise ConfigError(f"afterburner.enabled: false, but --speculative-algorithm {NAME} is afterburner's; "
                          "drop the flag or enable afterburner")
    heads = _heads_config(server_args.speculative_draft_model_path)
    make_tree(heads, server_args.speculative_num_draft_tokens, config)
    if config.medusa.acceptance != "lossless":
        raise ConfigError(f"afterburner.medusa.acceptance: {config.medusa.acceptance!r} is not available on "
                          "SGLang (its tree verify is lossless only); use 'lossless'")
    if server_args.speculative_use_rejection_sampling:
        raise ConfigError(f"--speculative-use-rejection-sampling: {NAME} drafts have no proposal "
                          "distribution; leave it off (temperature > 0 already verifies losslessly)")
    problem = cpu_blocker(server_args.device, *attention_backends(server_args))
    if problem:
        raise ConfigError(problem)


def handle_server_args(server_args: Any) -> None:
    """SGLang's per-algorithm defaults, for Medusa (runs after ``validate_server_args``)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    heads = _heads_config(server_args.speculative_draft_model_path)
    tree = make_tree(heads, server_args.speculative_num_draft_tokens, from_env())
    server_args.speculative_num_draft_tokens = tree.num_nodes
    # KV reserved per request and step: max(steps * topk, num_draft_tokens) = the tree.
    server_args.speculative_num_steps = tree.depth
    server_args.speculative_eagle_topk = 1
    server_args.disable_overlap_schedule = True  # the worker runs synchronously (supports_overlap=False)
    server_args.enable_mixed_chunk = False  # a mixed step would decode running requests without their tree
    # SGLang captures TARGET_VERIFY graphs only for its own algorithms (get_spec_info -> None for ours).
    server_args.cuda_graph_config = with_phase(server_args.cuda_graph_config, Phase.DECODE,
                                               backend=Backend.DISABLED)


def _create_worker(_server_args: Any) -> type:
    """SGLang's worker factory (the scheduler calls it); the worker module imports SGLang's verify path."""
    from afterburner.plugins.sglang.medusa_worker import MedusaWorker

    return MedusaWorker


@functools.cache
def _spec_class() -> type:
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class MedusaSpecAlgo(CustomSpecAlgo):
        """SGLang's algorithm interface, for Medusa: no draft KV, hidden states or top-k draft."""

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

    return MedusaSpecAlgo


class MedusaHeadsConfig(PretrainedConfig):
    """Lets transformers read a heads folder's config.json: SGLang reads the draft path's config with
    ``AutoConfig`` for every algorithm (``_resolve_speculative_algorithm_alias``), before our validator."""

    model_type = "medusa"


def register_algorithms() -> list[str]:
    """Idempotent (SGLang loads plugins more than once per process). Returns what it registered; a name
    SGLang reserves or another plugin holds is left to them, with one warning."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    try:
        AutoConfig.register(MedusaHeadsConfig.model_type, MedusaHeadsConfig)
    except ValueError:  # already registered, by an earlier call or someone else: theirs reads it too
        pass
    registered = []
    for name in (NAME, ALIAS):
        existing = get_spec(name)
        if existing is None or existing.factory is not _create_worker:
            try:
                SpeculativeAlgorithm.register(name, supports_overlap=False, spec_class=_spec_class(),
                                              validate_server_args=validate_server_args)(_create_worker)
            except ValueError as exc:
                logger.warning("afterburner: --speculative-algorithm %s left as it is (%s); use %s",
                               name, exc, NAME)
                continue
        registered.append(f"speculative algorithm {name}")
    return registered
