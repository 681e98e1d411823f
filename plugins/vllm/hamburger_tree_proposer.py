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

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec=None, token_ids_cpu=None,
                slot_mappings=None) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [i for i, tokens in enumerate(sampled_token_ids)
                if tokens and i < len(self.has_features) and self.has_features[i]]
        if not rows or self.features is None:
            return drafts
        tree = self.full_tree
        last = torch.tensor([sampled_token_ids[i][-1] for i in rows])
        topk = self.drafter.draft_topk(self.features[rows].float(), last, depth=tree.depth, topk=tree.topk)
        for i, nodes in zip(rows, flatten_candidates(topk, tree).tolist(), strict=True):
            drafts[i] = nodes
        stats.SPECULATION.count_proposals([tree.num_nodes - 1] * len(rows), self.num_speculative_tokens)
        self.features = None
        return drafts
