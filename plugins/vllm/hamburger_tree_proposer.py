"""The micro-step drafter drafting a token tree from its first micro-steps (``speculative.tree`` set with
``"method": "hamburger"``), verified by afterburner's tree verification (``tree_speculation``).

The drafter runs its greedy chain ``tree.depth`` micro-steps deep and keeps the top-k at each
(``MicroStepDrafter.draft_topk``); the tree's N nodes are handed to vLLM in node order, as the draft-model
tree does (``draft_tree_proposer``). The tree fixes the draft's shape, so the stop head is not used. On
vLLM's ``custom_class`` route like the chain proposer; the runner hooks find a ``TreeProposer`` and verify
the step as a tree, move the accepted path's KV entries and target features where vLLM's chain layout
has them, then hand the drafter the features at the accepted path's last node.
"""

from __future__ import annotations

import torch

from afterburner.plugins import stats
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm.hamburger_proposer import HamburgerProposer
from afterburner.plugins.vllm.tree_speculation import TreeProposer
from afterburner.spec_decode.draft.draft_tree import draft_tree, flatten_candidates

logger = get_logger(__name__)


class HamburgerTreeProposer(TreeProposer, HamburgerProposer):
    def __init__(self, vllm_config):
        HamburgerProposer.__init__(self, vllm_config)
        self.init_tree_state(vllm_config)

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.full_tree = full = draft_tree(self.settings.tree, self.num_speculative_tokens)
        logger.info("hamburger: token tree of %d nodes (depth %d, top-%d) from the first micro-steps, %s acceptance",
                    full.num_nodes, full.depth, full.topk, self.settings.acceptance)

    def draft_rows(self, features: torch.Tensor, last: torch.Tensor) -> list[list[int]]:
        """The tree's N node tokens per row, in node order."""
        tree = self.full_tree
        topk = self.drafter.draft_topk(features, last, depth=tree.depth, topk=tree.topk)
        stats.SPECULATION.count_proposals([tree.num_nodes - 1] * len(last), self.num_speculative_tokens)
        return flatten_candidates(topk, tree).tolist()
