"""Which afterburner methods compose in one vLLM engine (README, Composing methods). A pairing that does
not work yet is refused with one line naming the pair, at startup or for the request that asks for it;
it is never served silently without one of its methods.

Refused at startup (``check_engine``, from ``hooks.check_engine_config``):
- a selective attention method (sparse, squeezed) with speculative decoding: every decode step of such an
  engine is a verification step, whose rows read the whole KV cache (selection inside verification steps
  is not built);
- local-linear attention with a token tree (Medusa, ``speculative.tree`` other than "chain"): tree
  verification runs softmax attention. Chains are verified like prefill chunks, by the method itself.
AWRS with speculative decoding: vLLM runs no logits processors there, so afterburner verifies the
constrained rows' drafts with AWRS's own draws (``awrs_speculative``). Refused per request
(``check_request``, from the admission patch), where that cannot work: engines with async scheduling,
token trees, and logprobs on such requests.
"""

from __future__ import annotations

from typing import Any

from afterburner.attention_backends.registry import OUTPUT_METHODS
from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import proposers
from afterburner.plugins.vllm.config_access import config_of
from afterburner.samplers.request import is_constrained

SELECTIVE_METHODS = ("sparse", "squeezed")


def check_engine(vllm_config: Any) -> None:
    config = config_of(vllm_config)
    method = proposers.method_of(getattr(vllm_config, "speculative_config", None))
    if not config.enabled or method is None:
        return
    attention = config.attention.method
    if attention in SELECTIVE_METHODS:
        raise ConfigError(f"afterburner.attention.method {attention!r} with speculative decoding ({method!r}) is "
                          "not supported yet: its verification steps would read the whole KV cache; use one of them")
    tree = config.speculative.tree
    if attention in OUTPUT_METHODS and method == "medusa" and tree != "chain":
        raise ConfigError(f"afterburner.attention.method {attention!r} with a Medusa token tree (speculative.tree "
                          f"{tree!r}): tree verification runs softmax attention; set speculative.tree to \"chain\"")


def check_request(input_processor: Any, params: Any, *_args: Any, **_kwargs: Any) -> None:
    """Before vLLM validates a request's parameters: a ``ValueError`` here is that request's 400."""
    vllm_config = getattr(input_processor, "vllm_config", None)
    method = proposers.method_of(getattr(vllm_config, "speculative_config", None))
    if method is None or not is_constrained(getattr(params, "extra_args", None)):
        return
    reason = awrs_refusal(vllm_config, method)
    if reason is None and getattr(params, "logprobs", None) is not None:
        reason = "its logprobs would be the unconstrained sampler's; leave logprobs off"
    if reason is not None:
        raise ValueError(f"afterburner: AWRS (vllm_xargs awrs_*) with speculative decoding ({method!r}) is not "
                         f"supported here: {reason}")


def awrs_refusal(vllm_config: Any, method: str) -> str | None:
    """Why AWRS cannot verify this engine's drafts (None: it can, ``awrs_speculative``)."""
    config = config_of(vllm_config)
    if not config.enabled:
        return "afterburner is off in this server"
    if vllm_config.scheduler_config.async_scheduling:
        return "the engine schedules asynchronously (AWRS needs each step's committed tokens); start it with " \
               "--no-async-scheduling"
    if method == "medusa" and config.speculative.tree != "chain":
        return "a token tree is verified as a tree (AWRS verifies chains); set afterburner.speculative.tree to " \
               "\"chain\""
    return None
