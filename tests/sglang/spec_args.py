"""What the tests of afterburner's SGLang speculative algorithms share (``test_sglang_medusa``,
``test_sglang_hamburger``): SGLang's own argument resolution, and the interface every such algorithm has."""

import pytest

from afterburner.plugins.config import ConfigError
from afterburner.plugins.sglang import spec_algorithms


def resolve(model, *flags, backend="torch_native"):
    """The real parser and SGLang's argument resolution (where validate_server_args runs): (args, the view)."""
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", str(model), "--device", "cpu", "--attention-backend", backend, *flags])
    args.resolve_once()
    return args, resolved_view(args)


def assert_registered(name: str) -> None:
    """``--speculative-algorithm name`` resolves to afterburner's algorithm: validated by it, synchronous, no
    draft KV, hidden states or top-k draft in SGLang's sense, none of SGLang's own algorithms."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string(name)
    assert algo.validate_server_args is spec_algorithms.validate_server_args and not algo.supports_overlap
    assert not algo.has_draft_kv() and not algo.need_topk() and not algo.carries_draft_hidden_states()
    assert not algo.is_eagle() and not algo.is_eagle3() and not algo.is_ngram() and algo.is_speculative()


def assert_refused(monkeypatch, model, config: str | None, message: str, *flags) -> None:
    """With ``AFTERBURNER_CONFIG`` = ``config`` (None: unset), resolving ``flags`` stops with one ``ConfigError``
    line that matches ``message``."""
    if config is None:
        monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    else:
        monkeypatch.setenv("AFTERBURNER_CONFIG", config)
    with pytest.raises(ConfigError, match=message) as caught:
        resolve(model, *flags)
    assert "\n" not in str(caught.value)
