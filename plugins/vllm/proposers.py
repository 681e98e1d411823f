"""afterburner's speculative proposers in vLLM, by ``--speculative-config`` method: the one table the
runner hooks (``tree_speculation``) and the startup check (``hooks.check_speculative_config``) read.
Adding a proposer: its engine-free part under ``spec_decode/<name>/``, a vLLM proposer class mixed with
``tree_speculation.TreeProposer``, and one line below.

Classes are named by path and imported at first use: registration runs in every vLLM process, most of
which never build a model runner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ProposerEntry:
    proposer: str  # "module:Class", a vLLM proposer class with tree_speculation.TreeProposer
    check: str  # "module:function", fn(spec: dict, config, engine_args) -> None, raises ConfigError


PROPOSERS: dict[str, ProposerEntry] = {
    "medusa": ProposerEntry("afterburner.plugins.vllm.medusa_proposer:AfterburnerMedusaProposer",
                            "afterburner.plugins.vllm.medusa_proposer:check_config"),
}


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def proposer_class(method: str) -> type:
    return _load(PROPOSERS[method].proposer)


def config_check(method: str):
    return _load(PROPOSERS[method].check)
