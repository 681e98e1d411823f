"""The constraint interface the samplers use: is this next token allowed after this prefix, and is this
prefix a complete sequence. End of sequence is allowed exactly when the prefix is complete.

Built-in here: any Python predicate on the decoded text (``TextPredicate``), the case where checking the
whole vocabulary at every step is prohibitively expensive and AWRS shines.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence


class Constraint(Protocol):
    def allows(self, prefix: Sequence[int], token: int) -> bool:
        """May ``token`` follow ``prefix`` (prefix: the generated token ids so far, EOS excluded)?"""

    def is_complete(self, prefix: Sequence[int]) -> bool:
        """Is ``prefix`` a finished sequence that satisfies the constraint (so EOS may follow)?"""


def allows_next(constraint: Constraint, prefix: Sequence[int], token: int, eos_token_id: int) -> bool:
    """The one check the samplers make per drawn token: EOS means "complete here"."""
    if token == eos_token_id:
        return constraint.is_complete(prefix)
    return constraint.allows(prefix, token)


class TextPredicate:
    """A constraint given as predicates on text.

    ``prefix_ok(text)``: can ``text`` still be extended into an accepted string (a viable prefix)?
    ``complete_ok(text)``: is ``text`` itself accepted? (default: ``prefix_ok``)
    ``decode(token_ids)``: the tokenizer's decoding of generated ids.
    """

    def __init__(
        self,
        prefix_ok: Callable[[str], bool],
        decode: Callable[[Sequence[int]], str],
        complete_ok: Callable[[str], bool] | None = None,
    ):
        self.prefix_ok = prefix_ok
        self.complete_ok = complete_ok or prefix_ok
        self.decode = decode

    def allows(self, prefix: Sequence[int], token: int) -> bool:
        return self.prefix_ok(self.decode([*prefix, token]))

    def is_complete(self, prefix: Sequence[int]) -> bool:
        return self.complete_ok(self.decode(list(prefix)))

