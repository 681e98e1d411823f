"""AWRS on a vLLM engine with speculative decoding (README, Composing methods).

vLLM builds no logits processors when speculative decoding is on, so AWRS cannot act as one there.
Instead, after the model runner samples (``GPUModelRunner._sample``, patched in
``patches/vllm_speculative_awrs.py``), every constrained row's tokens are replaced by what AWRS alone
gives: ``samplers.speculative`` draws AWRS's own token at the root and at each accepted node (from the
target's logits there, given the committed tokens and the drafts accepted so far) and accepts a draft
only when it equals that draw: along a chain, or down a token tree (Medusa, a draft model or the
micro-step drafter with ``speculative.tree``). The kept nodes replace the unconstrained rule's in
afterburner's tree bookkeeping and counters (``tree_speculation.reaccept``). Greedy output is
token-identical to AWRS without speculation; sampled output has its distribution (each request's own
seeded generator, as without speculation). vLLM's bookkeeping and spec-decode metrics then count what
AWRS accepted. Steps without drafts (a batch with none) go through the same path with one logits row
per request.

Before the scheduler takes the next step's drafts (``GPUModelRunner.take_draft_token_ids``, patched too),
each constrained request's chain is cut at its first draft the constraint forbids (``allowed_drafts``):
those could never be accepted, so they are not verified (``constrained_cut`` counts them). Token trees
keep their nodes: cutting a tree in node order would drop allowed siblings after a forbidden node.

Needs the committed tokens at sampling time, so engines with async scheduling are refused per request
(``composition.check_request``).
Each request's state lives from its first sampled step until vLLM forgets the request (finished,
aborted); preempted requests keep theirs.
"""

from __future__ import annotations

import functools
from weakref import WeakKeyDictionary

import torch

from afterburner.plugins import report, stats
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import tree_speculation
from afterburner.plugins.vllm.awrs_rows import draw, make_compiler, start_state
from afterburner.plugins.vllm.config_access import config_of
from afterburner.samplers.constraints import allows_next
from afterburner.samplers.request import is_constrained
from afterburner.samplers.request_state import RequestState
from afterburner.samplers.speculative import allowed_drafts, verify_chain, verify_tree

logger = get_logger(__name__)
PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID in sampled_token_ids


class SpeculativeAWRS:
    """The constrained rows of one model runner."""

    def __init__(self, vllm_config):
        self.compiler = make_compiler(vllm_config)
        self.states: dict[str, object] = {}  # request id -> PendingState | RequestState | FailedState

    def apply(self, output, runner, logits: torch.Tensor, spec_decode_metadata) -> None:
        for req_id in [r for r in self.states if r not in runner.requests]:  # finished or aborted
            report.record("awrs", **self.states.pop(req_id).summary())
        num_reqs = runner.input_batch.num_reqs
        num_drafts = spec_decode_metadata.num_draft_tokens if spec_decode_metadata is not None else [0] * num_reqs
        discard = runner.discard_request_mask.np
        sampled = output.sampled_token_ids
        first_row = first_draft = 0
        for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            n = int(num_drafts[row])
            rows, draft_rows = slice(first_row, first_row + n + 1), slice(first_draft, first_draft + n)
            first_row, first_draft = first_row + n + 1, first_draft + n
            request = runner.requests[req_id]
            params = request.sampling_params
            if params is None or discard[row] or not is_constrained(params.extra_args):
                continue
            if req_id not in self.states:
                self.states[req_id] = start_state(self.compiler, params)
            row_drafts = spec_decode_metadata.draft_token_ids[draft_rows].tolist() if n else []  # constrained rows only
            draw, prefix = functools.partial(self._draw, req_id), list(request.output_token_ids)
            tree = tree_speculation.row_tree(runner, row)
            if tree is None:
                tokens = verify_chain(draw, logits[rows].float(), prefix, row_drafts)
                nodes = list(range(len(tokens)))
            else:
                tokens, nodes = verify_tree(draw, tree, [PLACEHOLDER, *row_drafts], logits[rows].float(), prefix)
            tree_speculation.reaccept(runner, row, nodes)
            sampled[row].fill_(PLACEHOLDER)
            sampled[row, : len(tokens)] = torch.tensor(tokens, dtype=sampled.dtype)
            stats.SPECULATION.constrained_steps += 1
            stats.SPECULATION.constrained_drafts += n
            stats.SPECULATION.constrained_accepted += len(tokens) - 1

    def cut_drafts(self, runner, draft_ids) -> None:
        """Each constrained request's chain of drafts for the next step (``draft_ids``: vLLM's
        ``DraftTokenIds``), cut in place at its first forbidden draft. Requests whose constraint is still
        compiling keep theirs (AWRS verifies them all the same)."""
        if tree_speculation.drafts_tree(runner):
            return
        for i, (req_id, drafts) in enumerate(zip(draft_ids.req_ids, draft_ids.draft_token_ids, strict=False)):
            state, request = self.states.get(req_id), runner.requests.get(req_id)
            if not isinstance(state, RequestState) or request is None or not drafts:
                continue
            allows = functools.partial(allows_next, state.constraint, eos_token_id=state.eos_token_id)
            kept = allowed_drafts(allows, request.output_token_ids, drafts)
            state.checks += min(kept + 1, len(drafts))
            if kept < len(drafts):
                draft_ids.draft_token_ids[i] = list(drafts[:kept])
                stats.SPECULATION.constrained_cut += len(drafts) - kept

    def _draw(self, req_id: str, row_logits: torch.Tensor, prefix: list[int]) -> int:
        state, token = draw(self.states[req_id], row_logits, prefix)
        self.states[req_id] = state
        return token


_of_runner: WeakKeyDictionary = WeakKeyDictionary()


def on_sample(output, runner, logits, spec_decode_metadata, *_args, **_kwargs) -> None:
    """After ``GPUModelRunner._sample`` on an engine with speculative decoding and afterburner on."""
    if runner.speculative_config is None or logits is None:
        return
    awrs = _of_runner.get(runner)
    if awrs is None:
        if not config_of(runner.vllm_config).enabled:
            return
        awrs = _of_runner[runner] = SpeculativeAWRS(runner.vllm_config)
    awrs.apply(output, runner, logits, spec_decode_metadata)


def on_take_drafts(draft_ids, runner, *_args, **_kwargs) -> None:
    """After ``GPUModelRunner.take_draft_token_ids``: constrained chains cut before they are verified."""
    awrs = _of_runner.get(runner)
    if awrs is not None and draft_ids is not None:
        awrs.cut_drafts(runner, draft_ids)
