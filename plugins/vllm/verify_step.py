"""A tree verification step, handed explicitly from the model runner's hooks to attention.

The runner hook (``tree_speculation.on_prepare_inputs``) makes a ``VerifyStep`` and gives it to every
afterburner metadata builder of the runner (``hand_to_builders``); the builder attaches it to the
metadata of the step it builds next (``VerifyMetadata.verify_step``) and forgets it, so the attention Impl
reads it from its own ``attn_metadata`` argument, and dummy or later steps never see a stale one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class VerifyStep:
    """One verification step.

    num_tokens  query tokens in the step (all requests)
    num_reqs    requests in the step
    rows        batch row -> (its first tree token, tree size incl. the root), for rows that carry drafts
    tree_mask   [N, N] bool, the largest tree's ancestor mask (a prefix of it is each smaller tree's)
    accepted    row -> accepted node indices (root first), filled by the acceptance hook
    shared      what the first attention layer prepared for the step's other layers (the C op's plan)
    """

    num_tokens: int
    num_reqs: int
    rows: dict[int, tuple[int, int]]
    tree_mask: torch.Tensor
    accepted: dict[int, list[int]] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    @property
    def tree_sizes(self) -> dict[int, int]:
        return {row: size for row, (_, size) in self.rows.items()}


class VerifyStepReceiver:
    """Mixin for afterburner's metadata builders: holds the step for the next ``build``."""

    pending_step: VerifyStep | None = None

    def take_step(self) -> VerifyStep | None:
        step, self.pending_step = self.pending_step, None
        return step


def builders_of(runner, kind: type) -> list:
    """The metadata builders of ``runner`` that are ``kind`` (afterburner's receivers)."""
    return [builder for group in itertools.chain.from_iterable(runner.attn_groups)
            for builder in group.metadata_builders if isinstance(builder, kind)]


def hand_to_builders(runner, step: VerifyStep | None) -> None:
    """Give ``step`` (None: no tree this step) to each afterburner metadata builder of ``runner``."""
    for builder in builders_of(runner, VerifyStepReceiver):
        builder.pending_step = step
