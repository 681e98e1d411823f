"""SpecPC per request: the startup check of ``afterburner.specpc.draft`` and the per-request admission rules
(engine-free: the engine path is ``tests/vllm/test_specpc_vllm.py`` and ``tests/vllm/test_serve.py``)."""

import json
from types import SimpleNamespace

import pytest

from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import specpc


def _engine(draft=None, vocab=1000):
    section = {"specpc": {"draft": str(draft)}} if draft is not None else {}
    return SimpleNamespace(additional_config={"afterburner": section},
                           model_config=SimpleNamespace(hf_config=SimpleNamespace(vocab_size=vocab)))


def _draft(tmp_path, vocab):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return tmp_path


def test_startup_accepts_a_draft_sharing_the_vocabulary_and_refuses_others(tmp_path):
    specpc.check_engine(_engine(_draft(tmp_path, 1000)))
    specpc.check_engine(_engine())  # no draft: nothing to check
    with pytest.raises(ConfigError, match="afterburner.specpc.draft: the draft's vocabulary has 999 tokens"):
        specpc.check_engine(_engine(_draft(tmp_path, 999)))
    with pytest.raises(ConfigError, match="is not a model folder") as err:
        specpc.check_engine(_engine(tmp_path / "missing"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra, expected", [(None, None), ({}, None), ({"other": 1}, None),
                                             ({"specpc_capacity": 512}, 512)])
def test_requested_capacity(extra, expected):
    assert specpc.requested_capacity(extra) == expected


@pytest.mark.parametrize("value", [True, "half", 1.5, None, [512]])
def test_a_capacity_that_is_not_an_integer_is_refused(value):
    with pytest.raises(ValueError, match="specpc_capacity must be an integer"):
        specpc.requested_capacity({"specpc_capacity": value})


def test_admission(tmp_path):
    params = SimpleNamespace(extra_args={"specpc_capacity": 256})
    specpc.check_request(SimpleNamespace(vllm_config=_engine(_draft(tmp_path, 1000))), params)
    with pytest.raises(ValueError, match="needs a server started with a SpecPC draft"):
        specpc.check_request(SimpleNamespace(vllm_config=_engine()), params)
    small = SimpleNamespace(extra_args={"specpc_capacity": 16})
    with pytest.raises(ValueError, match=r"capacity \(16\) must be >= window \(64\)"):
        specpc.check_request(SimpleNamespace(vllm_config=_engine(_draft(tmp_path, 1000))), small)
    specpc.check_request(SimpleNamespace(vllm_config=_engine()), SimpleNamespace(extra_args=None))  # not asked
