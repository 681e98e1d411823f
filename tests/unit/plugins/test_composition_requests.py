"""Per-request admission of AWRS beside speculative decoding, engine-free (``composition.check_request``):
a constrained request is refused with one line naming the pair where AWRS cannot verify the drafts
(asynchronous scheduling, logprobs asked for), and admitted otherwise (chains and token trees); vLLM's own
structured outputs are refused beside a token tree. The engine paths that do
compose are ``tests/vllm/test_awrs_speculative_vllm.py``."""

from types import SimpleNamespace

import pytest

from afterburner.plugins.vllm import composition

AWRS = {"awrs_regex": "[a-z]+"}


def _processor(method="medusa", tree="chain", async_scheduling=False):
    spec = None if method is None else SimpleNamespace(method=method, model="/heads")
    config = SimpleNamespace(additional_config={"afterburner": {"speculative": {"tree": tree}}},
                             speculative_config=spec,
                             scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
    return SimpleNamespace(vllm_config=config)


def _params(extra_args=AWRS, logprobs=None, structured_outputs=None):
    return SimpleNamespace(extra_args=extra_args, logprobs=logprobs, structured_outputs=structured_outputs)


def test_awrs_with_a_chain_or_a_tree_is_admitted():
    composition.check_request(_processor(), _params())
    composition.check_request(_processor(tree="paper"), _params())
    composition.check_request(_processor("ngram"), _params())
    composition.check_request(_processor(None), _params(logprobs=1))  # no speculation: nothing to check
    composition.check_request(_processor(tree="paper"), _params(extra_args=None))  # unconstrained


@pytest.mark.parametrize("processor, params, reason", [
    (_processor("ngram", async_scheduling=True), _params(),
     "the engine schedules asynchronously .* --no-async-scheduling"),
    (_processor(), _params(logprobs=1), "its logprobs would be the unconstrained sampler's"),
])
def test_where_awrs_cannot_verify_the_drafts_the_request_is_refused(processor, params, reason):
    with pytest.raises(ValueError, match=r"^afterburner: AWRS \(vllm_xargs awrs_\*\) with speculative decoding "
                                         rf"\('(medusa|ngram)'\) is not supported here: {reason}") as error:
        composition.check_request(processor, params)
    assert "\n" not in str(error.value)


def test_vllms_structured_outputs_beside_a_tree_are_refused_and_beside_a_chain_admitted():
    schema = SimpleNamespace(json={"type": "object"})
    composition.check_request(_processor(tree="chain"), _params(extra_args=None, structured_outputs=schema))
    composition.check_request(_processor("ngram", tree="paper"), _params(extra_args=None, structured_outputs=schema))
    with pytest.raises(ValueError, match=r"^afterburner: vLLM's structured outputs with a token tree \('medusa'\) "
                                         r"are not supported: .* use AWRS") as error:
        composition.check_request(_processor(tree="paper"), _params(extra_args=None, structured_outputs=schema))
    assert "\n" not in str(error.value)
