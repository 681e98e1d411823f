"""One constrained request's decoding state, shared by the engine adapters (vLLM's logits processor,
SGLang's custom logit processor): which token the engine may sample next, and what finding it cost.

Each step the adapter hands over the row's logits [V] and the generated prefix; ``RequestState.draw``
returns the one token to force (``force_token`` leaves it the only finite logit, so the engine's sampler,
greedy or random after temperature / top-k / top-p, can only pick it):
- greedy (temperature None): the highest-logit allowed token (``constrained_argmax``);
- temperature T > 0: an exact sample of softmax(logits / T) restricted to the allowed tokens
  (``awrs_step``), drawn from the request's own generator; its log weight is added to the sequence's;
- the check budget (``max_checks``) ran out, or the model puts (numerically) no mass on the allowed tokens:
  the draw finishes exactly from the allowed set by the constraint's full mask (``exact_draw``), counted
  in ``fallbacks``: a constrained request never ends mid-value while a valid continuation exists;
- no allowed token at all: EOS, so the request ends instead of hanging; one warning.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from afterburner.samplers.awrs import awrs_step, constrained_argmax, exact_draw
from afterburner.samplers.constraints import allows_next
from afterburner.samplers.grammar import GrammarConstraint
from afterburner.samplers.request import ConstraintRequest

# A child of the "afterburner" logger, which the adapters configure (samplers/ never import plugins/).
logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    request: ConstraintRequest
    constraint: GrammarConstraint  # its llguidance matcher follows the prefix incrementally
    eos_token_id: int
    temperature: float | None  # None: greedy
    generator: torch.Generator  # the request's own: seeded draws do not depend on the batch
    checks: int = 0  # constraint evaluations so far
    tokens: int = 0  # draws so far
    log_weight: float = 0.0  # sum of AWRS log weights: the sequence's importance weight
    unsatisfiable: bool = False  # a step found no allowed token and forced EOS
    fallbacks: int = 0  # steps finished from the full mask after the sampled checks ran out
    compile_wait_s: float = 0.0  # how long the first step waited for the constraint (``pending``)

    @classmethod
    def start(cls, request: ConstraintRequest, tokenizer: llguidance.LLTokenizer | None, eos_token_id: int, *,
              temperature: float | None, seed: int | None,
              constraint: GrammarConstraint | None = None) -> RequestState:
        """``GrammarError`` if the grammar does not compile against this tokenizer. ``constraint``: one
        already compiled (off the engine step, ``pending``); then ``tokenizer`` is not used."""
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # non-deterministic, and leaves torch's global generator alone
        else:
            generator.manual_seed(seed)
        if constraint is None:
            constraint = GrammarConstraint(request.grammar, tokenizer)
        return cls(request, constraint, eos_token_id, temperature, generator)

    def draw(self, logits: torch.Tensor, prefix: Sequence[int]) -> int:
        """The next token after ``prefix`` (generated ids, prompt excluded). logits: [V]."""
        accept = lambda token: allows_next(self.constraint, prefix, token, self.eos_token_id)
        if self.temperature is None:
            token, checks = constrained_argmax(logits, accept, max_checks=self.request.max_checks)
        else:
            result = awrs_step(logits / self.temperature, accept, generator=self.generator,
                               max_checks=self.request.max_checks)
            token, checks = (result.token if result.accepted else None), result.checks
            if result.accepted:  # otherwise the exact finish below supplies the weight
                self.log_weight += result.log_weight
        self.checks += checks
        self.tokens += 1
        if token is None:
            token = self._finish_exactly(logits, prefix)
        if token is None:
            if not self.unsatisfiable:
                logger.warning("afterburner: AWRS found no allowed token after %d generated tokens (%s "
                               "constraint unsatisfiable here); ending the request with EOS", len(prefix),
                               self.request.kind)
            self.unsatisfiable = True
            self.log_weight = -math.inf
            token = self.eos_token_id
        return token

    def _finish_exactly(self, logits: torch.Tensor, prefix: Sequence[int]) -> int | None:
        """The step's token from the constraint's full mask (None: nothing is allowed)."""
        mask = self.constraint.allowed_tokens(prefix, logits.shape[-1], self.eos_token_id)
        token, log_z = exact_draw(logits, mask, temperature=self.temperature, generator=self.generator)
        if token is not None:
            self.fallbacks += 1
            self.checks += logits.shape[-1]  # the full mask checks every token
            if self.temperature is not None:
                self.log_weight += log_z  # the walk's -inf weight is replaced by the exact allowed mass
        return token

    def summary(self) -> dict[str, Any]:
        """The fields of the ``awrs`` report event each adapter records when the request ends."""
        return {"kind": self.request.kind, "tokens": self.tokens, "checks": self.checks,
                "log_weight": self.log_weight, "unsatisfiable": self.unsatisfiable, "fallbacks": self.fallbacks,
                "compile_wait_s": self.compile_wait_s}


@dataclass
class FailedState:
    """A constrained request whose constraint could not be used in the engine (it does not compile against
    the model's tokenizer, or checking it raised): it ends at its next step (EOS), alone, with its reason;
    the engine and the other requests go on."""

    kind: str
    reason: str
    eos_token_id: int
    tokens: int = 0
    compile_wait_s: float = 0.0  # how long the first step waited for the constraint (``pending``)

    def draw(self, logits: torch.Tensor, prefix: Sequence[int]) -> int:
        self.tokens += 1
        return self.eos_token_id

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": self.tokens, "checks": 0, "log_weight": -math.inf,
                "unsatisfiable": True, "fallbacks": 0, "compile_wait_s": self.compile_wait_s, "error": self.reason}


def failed(kind: str, error: BaseException, eos_token_id: int) -> FailedState:
    """The state of a request whose constraint failed with ``error``: one warning, then EOS."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:500]  # one line, bounded
    logger.warning("afterburner: AWRS cannot use this request's %s constraint (%s); ending the request", kind,
                   reason)
    return FailedState(kind, reason, eos_token_id)


def force_token(row: torch.Tensor, token: int) -> None:
    """Leave ``token`` the only finite logit of ``row`` [V], in place."""
    row.fill_(-math.inf)
    row[token] = 0.0


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, n_vocab: int, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> tuple[llguidance.LLTokenizer, int]:
    """llguidance's view of the Hugging Face tokenizer at ``path`` and its EOS id. ``n_vocab``: the
    model's logits width (may exceed the tokenizer's size: padded embeddings). ~1 s; once per process
    and model, and only when a constrained request arrives."""
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return from_tokenizer(hf, n_vocab=n_vocab), hf.eos_token_id
