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
    # "module:Class": a vLLM proposer class (with tree_speculation.TreeProposer for a tree) that replaces
    # vLLM's, or a function of (vllm_config, device) that builds the right one
    proposer: str
    check: str  # "module:function", fn(spec: dict, config, engine_args) -> None, raises ConfigError
    # "replace": vLLM knows the method name and builds its own proposer, which the runner hook replaces;
    # "custom_class": a name vLLM does not know; the check rewrites the spec to vLLM's custom_class route
    route: str = "replace"
    # "module:function", fn(afterburner config) -> bool: whether afterburner's proposer replaces vLLM's for
    # this engine (None: always, when afterburner is on)
    wanted: str | None = None
    # custom_class route: the class that drafts a token tree, when ``speculative.tree`` asks for one
    tree_proposer: str | None = None
    # "module:function", fn(vllm_config) -> None, raises ConfigError: checks of what vLLM settles only after
    # the spec is read (scheduling), run by ``hooks.check_engine_config``
    engine_check: str | None = None


PROPOSERS: dict[str, ProposerEntry] = {
    "medusa": ProposerEntry("afterburner.plugins.vllm.medusa_proposer:AfterburnerMedusaProposer",
                            "afterburner.plugins.vllm.medusa_proposer:check_config"),
    "hamburger": ProposerEntry("afterburner.plugins.vllm.hamburger_proposer:HamburgerProposer",
                               "afterburner.plugins.vllm.hamburger_proposer:check_config", route="custom_class",
                               tree_proposer="afterburner.plugins.vllm.hamburger_tree_proposer:HamburgerTreeProposer"),
    "draft_model": ProposerEntry("afterburner.plugins.vllm.draft_proposer:make_proposer",
                                 "afterburner.plugins.vllm.draft_proposer:check_config",
                                 wanted="afterburner.plugins.vllm.draft_proposer:wanted",
                                 engine_check="afterburner.plugins.vllm.draft_proposer:check_engine"),
    "eagle3": ProposerEntry("afterburner.plugins.vllm.eagle3_stop:ConfidentEagleProposer",
                            "afterburner.plugins.vllm.eagle3_stop:check_config",
                            wanted="afterburner.plugins.vllm.eagle3_stop:wanted",
                            engine_check="afterburner.plugins.vllm.eagle3_stop:check_engine"),
}


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def replaces_vllm_proposer(method: str, config) -> bool:
    """Whether afterburner's proposer replaces vLLM's for ``method`` in an engine with afterburner ``config``."""
    entry = PROPOSERS.get(method)
    if entry is None or entry.route != "replace" or not config.enabled:
        return False
    return entry.wanted is None or _load(entry.wanted)(config)


def verifies_tree(method: str | None, config) -> bool:
    """Whether an engine running ``method`` with afterburner ``config`` verifies token trees (afterburner's
    tree attention and acceptance) rather than chains: Medusa unless ``speculative.tree`` is "chain"; vLLM's
    draft model and the micro-step drafter only when ``speculative.tree`` is set to a tree (their default is
    a chain)."""
    tree = config.speculative.tree
    if method == "medusa":
        return tree != "chain"
    if method in ("draft_model", "hamburger"):
        return "tree" in config.speculative.model_fields_set and tree != "chain"
    return False


def custom_class_path(method: str, tree: bool = False) -> str:
    """What vLLM's ``custom_class`` route is given as ``model`` for one of our methods (its tree drafter's
    class with ``tree``)."""
    entry = PROPOSERS[method]
    return (entry.tree_proposer if tree else entry.proposer).replace(":", ".")


def method_of(spec) -> str | None:
    """The proposer a vLLM ``SpeculativeConfig`` runs, by afterburner's name where it is ours
    (``hamburger`` for its custom_class route), else vLLM's method name; None without speculation."""
    if spec is None:
        return None
    for name, entry in PROPOSERS.items():
        if entry.route == "custom_class" and spec.method == "custom_class" and spec.model in (
                custom_class_path(name), entry.tree_proposer and custom_class_path(name, tree=True)):
            return name
    return spec.method


def build_proposer(method: str, vllm_config, device):
    """afterburner's proposer for ``method``, built as vLLM builds its own."""
    return _load(PROPOSERS[method].proposer)(vllm_config, device)


def config_check(method: str):
    return _load(PROPOSERS[method].check)


def check_engine(method: str | None, vllm_config) -> None:
    """The engine-level check of ``method``'s proposer, where it has one (ConfigError)."""
    entry = PROPOSERS.get(method)
    if entry is not None and entry.engine_check:
        _load(entry.engine_check)(vllm_config)


def check_draft_vocab(folder: str, config, vocab_size: int) -> None:
    """``speculative.draft_vocab`` fits ``folder``'s ranking, or one ConfigError line (every proposer)."""
    from afterburner.plugins.config import ConfigError
    from afterburner.spec_decode import draft_vocab

    if config.speculative.draft_vocab:
        try:
            draft_vocab.load(folder, config.speculative.draft_vocab, vocab_size)
        except draft_vocab.DraftVocabError as exc:
            raise ConfigError(str(exc)) from None
