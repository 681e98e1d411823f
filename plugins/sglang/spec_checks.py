"""Checks every afterburner speculative algorithm in SGLang (0.5.23) shares: the tree that fits the
drafter and ``--speculative-num-draft-tokens``, and whether SGLang's tree verify can run on this device."""

from __future__ import annotations

from typing import Any

from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.sglang import proposers
from afterburner.spec_decode.tree import TokenTree, build_tree
from afterburner.spec_decode.tree_choices import tree_paths

CPU_VERIFY_BACKENDS = ("torch_native", "intel_amx")


def proposer_tree(server_args: Any, num_draft_tokens: int | None, config: AfterburnerConfig) -> TokenTree:
    """The tree a server with ``--speculative-algorithm`` one of afterburner's verifies: the proposer's own
    shape (``ProposerEntry.tree``) or ``speculative.tree``, within the depth its drafter reaches."""
    algorithm = server_args.speculative_algorithm
    module = proposers.proposer_module(algorithm)
    shape = proposers.PROPOSERS[proposers.canonical(algorithm)].tree
    return make_tree(module.max_depth(server_args), num_draft_tokens, config, shape=shape)


def make_tree(max_depth: int, num_draft_tokens: int | None, config: AfterburnerConfig, *,
              shape: str | None = None) -> TokenTree:
    """The tree ``shape`` (default: ``config.speculative.tree``) with ``num_draft_tokens`` nodes, the root
    included (default: one node per depth the drafter reaches), or one ``ConfigError`` line naming the flag
    or field that does not fit."""
    drafts = max_depth if num_draft_tokens is None else num_draft_tokens - 1
    if drafts < 1:
        raise ConfigError(f"--speculative-num-draft-tokens: {num_draft_tokens} leaves no tree node to draft; "
                          "give at least 2 (the root and one node)")
    try:
        paths = tree_paths(shape or config.speculative.tree, max_depth=max_depth, num_drafts=drafts)
        return build_tree(paths, max_depth=max_depth)
    except ValueError as exc:
        raise ConfigError(f"afterburner.speculative.tree: {exc} (on SGLang --speculative-num-draft-tokens "
                          f"{drafts + 1} = the root + {drafts} drafted nodes)") from None


def cpu_blocker(algorithm: str, device: str, prefill_backend: str | None, decode_backend: str | None) -> str | None:
    """Why SGLang's tree verify cannot run with these settings (None: it can). On CPU the verify forward
    needs ``intel_amx`` (SGLang's own TARGET_VERIFY path) or ``torch_native`` (afterburner's:
    ``verify_attention``) for both prefill and decode."""
    if device != "cpu" or prefill_backend == decode_backend and prefill_backend in CPU_VERIFY_BACKENDS:
        return None
    used = "/".join(sorted({str(prefill_backend), str(decode_backend)}))
    return (f"--speculative-algorithm {algorithm} on CPU needs --attention-backend torch_native (or intel_amx on "
            f"an AMX CPU): SGLang's tree verify has no path through {used}")


def attention_blocker(algorithm: str, prefill_backend: str | None, decode_backend: str | None) -> str | None:
    """Why an afterburner attention backend cannot serve this algorithm's verification (None: no such
    backend): SGLang verifies a token tree, which selective attention does not cover and which local-linear
    attention would verify with softmax (README, Composing methods)."""
    ours = sorted({b for b in (prefill_backend, decode_backend) if b and b.startswith("afterburner-")})
    if not ours:
        return None
    return (f"--attention-backend {'/'.join(ours)} with --speculative-algorithm {algorithm} is not supported yet: "
            "tree verification steps would run outside the attention method; use one of them")


def attention_backends(server_args: Any) -> tuple[str | None, str | None]:
    """(prefill, decode) attention backends."""
    default = server_args.attention_backend
    return server_args.prefill_attention_backend or default, server_args.decode_attention_backend or default
