"""vLLM's draft-model proposer drafting a token tree from the draft's top-k (``spec_decode/draft/draft_tree.py``),
verified by afterburner's tree verification (``tree_speculation``).

Users keep vLLM's own ``--speculative-config '{"method": "draft_model", "model": DRAFT_DIR,
"num_speculative_tokens": N}'`` and add ``--additional-config '{"afterburner": {"speculative": {"tree":
"paper"}}}'`` (or explicit paths): N is the tree's node count. vLLM loads the draft, keeps its KV cache and
runs its greedy chain; afterburner runs that chain only as deep as the tree (not N passes), keeps the top-k at
each pass where vLLM takes the argmax (``_greedy_sample``), and hands vLLM the tree's N node tokens in node
order. The runner hooks verify them as a tree, then give the draft the accepted path as an ordinary chain
(tokens, positions and KV slots right after the root), so vLLM's draft model catches up exactly as after
a chain step. Without ``speculative.tree`` set, vLLM's chain runs untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm.tree_speculation import TreeProposer
from afterburner.spec_decode.draft.draft_tree import draft_tree, flatten_candidates

logger = get_logger(__name__)


class DraftTreeProposer(TreeProposer, DraftModelProposer):
    reads_step_tokens = True  # vLLM's draft model re-reads the step's tokens to catch its KV cache up

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.init_tree_state(vllm_config)
        self._topk: list[torch.Tensor] | None = None  # while drafting: [B, topk] per depth

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.full_tree = full = draft_tree(self.settings.tree, self.num_speculative_tokens)
        logger.info("draft model: token tree of %d nodes (depth %d, top-%d) from the draft's top-k, %s acceptance",
                    full.num_nodes, full.depth, full.topk, self.settings.acceptance)

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._topk is None:  # vLLM's warm-up passes
            return super()._greedy_sample(hidden_states)
        top = self.model.compute_logits(hidden_states).topk(self.full_tree.topk, dim=-1).indices
        self._topk.append(top)
        return top[:, 0]  # the chain continues from the greedy token

    def propose(self, num_speculative_tokens, *args: Any, **kwargs: Any) -> torch.Tensor:
        if num_speculative_tokens == 0:
            return super().propose(0, *args, **kwargs)
        tree = self.tree(num_speculative_tokens + 1)  # the nodes vLLM scheduled (a prefix of the full tree)
        self._topk = []
        try:
            super().propose(tree.depth, *args, **kwargs)  # one draft pass per depth
            topk = torch.stack(self._topk, dim=1)  # [B, depth, topk]
        finally:
            self._topk = None
        return flatten_candidates(topk, tree)
