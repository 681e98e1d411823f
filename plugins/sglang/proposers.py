"""afterburner's speculative algorithms in SGLang, by ``--speculative-algorithm`` name: the one table the
registration (``spec_algorithms``) and the worker (``tree_spec_worker``) read. Adding a proposer: its
engine-free part under ``spec_decode/<name>/``, a module here and one line below. Modules are imported at
first use. A proposer module has:

- ``max_depth(server_args) -> int``: how deep the drafter reaches (argument checks, in the user's process:
  one ``ConfigError`` line for a draft folder or flag that does not fit);
- ``load_drafter(server_args, runner, tree)`` (in the scheduler): an object with
  ``propose(hidden [B, X], roots [B]) -> tree_verify.Drafts``, where ``hidden`` is what the target's forward
  captured at each request's last accepted position and ``roots`` the tokens sampled there (with
  ``reads_tokens = True``: ``propose(hidden, roots, tokens, request_ids)``, each request's token ids before
  its root and its id);
- optionally ``handle_server_args(server_args)``: its own defaults, after the shared ones;
- a drafter that reads ``afterburner.speculative.draft_vocab`` takes its ids from ``drafting_vocabulary``;
- optionally ``FOLDER_CONFIG``: a transformers ``PretrainedConfig`` class for the draft folder's
  config.json ``model_type``. SGLang reads that file with ``AutoConfig`` for every algorithm
  (``_resolve_speculative_algorithm_alias``), before any validator; registration registers the class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ProposerEntry:
    module: str  # the proposer module (see the module docstring)
    aliases: tuple[str, ...] = ()  # other --speculative-algorithm names, if SGLang leaves them free
    tree: str | None = None  # the only tree the drafter fills ("chain"); None: afterburner.speculative.tree


PROPOSERS: dict[str, ProposerEntry] = {
    "AFTERBURNER_MEDUSA": ProposerEntry("afterburner.plugins.sglang.medusa", aliases=("MEDUSA",)),
    "AFTERBURNER_HAMBURGER": ProposerEntry("afterburner.plugins.sglang.hamburger", aliases=("HAMBURGER",),
                                           tree="chain"),
    "AFTERBURNER_DRAFT": ProposerEntry("afterburner.plugins.sglang.draft_model"),
}


def drafting_vocabulary(folder: str, vocab_size: int):
    """``afterburner.speculative.draft_vocab``'s token ids [size] from ``folder``'s ranking (the drafter scores
    only those: ``spec_decode.draft_vocab``), None when unset; one ``ConfigError`` line when they do not fit."""
    from afterburner.plugins.config import ConfigError, from_env
    from afterburner.spec_decode import draft_vocab

    size = from_env().speculative.draft_vocab
    if not size:
        return None
    try:
        return draft_vocab.load(folder, size, vocab_size)
    except draft_vocab.DraftVocabError as exc:
        raise ConfigError(str(exc)) from None


def names() -> dict[str, str]:
    """Every algorithm name (aliases included) -> its canonical name."""
    return {alias: name for name, entry in PROPOSERS.items() for alias in (name, *entry.aliases)}


def proposer_module(algorithm: str):
    """The module of ``algorithm`` (a name or an alias)."""
    return importlib.import_module(PROPOSERS[canonical(algorithm)].module)


def canonical(algorithm: str) -> str:
    """The registered name of ``algorithm`` (a name or an alias, in any case)."""
    known = names()
    return known.get(algorithm) or known[str(algorithm).upper()]
