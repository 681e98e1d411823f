"""A constrained sampler as the verifier of a speculative chain: the output is exactly what the sampler
alone would give (greedy: token for token; sampled: the same distribution), drafts only save steps.

At each position j of a verified chain (the root's logits, then each draft's), the sampler draws its own
token from the target's logits there, given the prefix so far (the committed tokens and the drafts
accepted before j). The draft at j is accepted when it equals that draw; the first draw that differs (or
the draw after the last draft: the bonus) ends the step. Every emitted token is thus the sampler's own
draw on the target's distribution at a prefix it emitted itself, which is the sampler alone, step by step.
A draft the constraint forbids can never equal a draw, so it is never accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def verify_chain(draw: Callable[[torch.Tensor, list[int]], int], logits: torch.Tensor, prefix: Sequence[int],
                 drafts: Sequence[int], eos_token_id: int | None = None) -> list[int]:
    """Tokens this step emits (accepted drafts, then the sampler's own token): at least one, at most
    ``len(drafts) + 1``. ``draw(logits_row [V], prefix) -> token``: the sampler's draw (e.g.
    ``RequestState.draw``); ``logits`` [len(drafts) + 1, V]: the target's at the root and each draft;
    ``prefix``: the committed generated tokens. Stops after EOS."""
    emitted: list[int] = []
    for j in range(len(drafts) + 1):
        token = draw(logits[j], [*prefix, *emitted])
        emitted.append(token)
        if j == len(drafts) or token != drafts[j] or token == eos_token_id:
            break
    return emitted
