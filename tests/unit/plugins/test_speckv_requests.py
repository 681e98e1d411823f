"""SpecKV per request, engine-free: the startup check of the draft (folder, vocabulary, kv heads), admission
(capacity, a server without SpecKV, afterburner's own key sent by a client), and the packed choice that
travels with a request (the engine path is ``tests/vllm/test_speckv_vllm.py``)."""

import json
from types import SimpleNamespace

import pytest
import torch

from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import speckv


def _engine(draft=None, method="speckv", vocab=1000, kv_heads=3):
    section = {"attention": {"method": method, "speckv": {"draft": str(draft) if draft else None}}}
    hf_config = SimpleNamespace(vocab_size=vocab, num_key_value_heads=kv_heads, num_hidden_layers=4)
    return SimpleNamespace(additional_config={"afterburner": section},
                           model_config=SimpleNamespace(hf_config=hf_config))


def _draft(tmp_path, vocab=1000, kv_heads=3):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab, "num_key_value_heads": kv_heads}))
    return tmp_path


def test_startup_needs_a_draft_with_the_models_vocabulary_and_kv_heads(tmp_path):
    speckv.check_engine(_engine(_draft(tmp_path)))
    speckv.check_engine(_engine(method="dense"))  # not serving SpecKV: nothing to check
    with pytest.raises(ConfigError, match="needs a draft model folder"):
        speckv.check_engine(_engine())
    with pytest.raises(ConfigError, match="the draft has 2 kv heads, the served model 3"):
        speckv.check_engine(_engine(_draft(tmp_path, kv_heads=2)))
    with pytest.raises(ConfigError, match="vocabulary has 999 tokens") as err:
        speckv.check_engine(_engine(_draft(tmp_path, vocab=999)))
    assert str(err.value).startswith("afterburner.attention.speckv.draft") and "\n" not in str(err.value)


def test_admission(tmp_path):
    serving = SimpleNamespace(vllm_config=_engine(_draft(tmp_path)))
    speckv.check_request(serving, SimpleNamespace(extra_args={"speckv_capacity": 256}))
    speckv.check_request(serving, SimpleNamespace(extra_args=None))  # not asked
    with pytest.raises(ValueError, match="needs a server started with SpecKV"):
        speckv.check_request(SimpleNamespace(vllm_config=_engine(method="sparse")),
                             SimpleNamespace(extra_args={"speckv_capacity": 256}))
    with pytest.raises(ValueError, match=r"capacity \(32\) must be > window \(32\)"):
        speckv.check_request(serving, SimpleNamespace(extra_args={"speckv_capacity": 32}))
    with pytest.raises(ValueError, match="speckv_capacity must be an integer"):
        speckv.check_request(serving, SimpleNamespace(extra_args={"speckv_capacity": "all"}))
    with pytest.raises(ValueError, match="afterburner_speckv_keep is set by afterburner itself"):
        speckv.check_request(serving, SimpleNamespace(extra_args={"afterburner_speckv_keep": {}}))


@pytest.mark.parametrize("shape", [(1, 1, 1), (30, 3, 1000), (2, 2, 7)])
def test_the_packed_choice_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = speckv.pack(mask)
    assert isinstance(packed["bits"], bytes) and len(packed["bits"]) == -(-mask.numel() // 8)
    assert torch.equal(speckv.unpack(packed), mask)


def test_a_failing_draft_is_kept_for_the_method_that_raised_it(tmp_path):
    """``request_drafts`` (the draft thread's work): a SpecKV-only request whose draft cannot load keeps the
    error under "speckv", where its hook takes it and raises it, instead of drafting again on the loop."""
    prompt = list(range(300))
    ready = speckv.request_drafts(_engine(tmp_path / "missing"), prompt, {"speckv_capacity": 64})
    assert list(ready) == ["speckv"]
    read, error, _ = ready["speckv"]
    assert read == prompt and isinstance(error, Exception)
