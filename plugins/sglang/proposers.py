"""afterburner's speculative algorithms in SGLang, by ``--speculative-algorithm`` name: the one table the
registration (``spec_algorithms``) and the worker (``tree_spec_worker``) read. Adding a proposer: its
engine-free part under ``spec_decode/<name>/``, a module here with ``max_depth(server_args)`` (argument
checks, in the user's process) and ``load_drafter(server_args, runner, tree)`` (in the scheduler), and one
line below. Modules are imported at first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ProposerEntry:
    module: str  # has max_depth(server_args) -> int and load_drafter(server_args, runner, tree) -> drafter
    aliases: tuple[str, ...] = ()  # other --speculative-algorithm names, if SGLang leaves them free


PROPOSERS: dict[str, ProposerEntry] = {
    "AFTERBURNER_MEDUSA": ProposerEntry("afterburner.plugins.sglang.medusa", aliases=("MEDUSA",)),
}


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
