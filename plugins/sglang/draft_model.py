"""A draft model as an afterburner proposer in SGLang (0.5.23), through ``spec_algorithms``:

    --speculative-algorithm AFTERBURNER_DRAFT  --speculative-draft-model-path DRAFT_FOLDER
    [--speculative-num-draft-tokens N]    N tokens verified per request: the root + N - 1 tree nodes
                                          (default: 4 drafted nodes)
    AFTERBURNER_CONFIG='{"speculative": {"tree": "chain" | "paper" | [[0], [1], [0, 0], ...]}}'
    AFTERBURNER_CONFIG='{"speculative": {"tree": "chain", "stop_threshold": P}}'   a chain cut per request
                                          before its first draft of draft probability below P

The draft is a Hugging Face causal LM with the target's vocabulary (``afterburner models draft`` derives one
from the target). Each step it runs its greedy chain after the request's tokens and keeps its top-k at every
depth (``spec_decode.draft.draft_tree``: the chain is the tree's greedy path; a chain setting keeps the
top-1); with ``stop_threshold`` each chain stops where the draft's confidence falls
(``spec_decode.draft.confident_chain``; SGLang verifies a fixed width, so the rest of the chain is cut, not
dropped: ``tree_verify.cut_links``). It runs with transformers in the scheduler process (SGLang's draft
workers need a draft attention backend that ``torch_native`` lacks), one request at a time, each through its
own draft KV cache (``spec_decode.draft.draft_cache``: a step feeds the draft only the tokens accepted since
the last; a request that leaves the batch drops its cache, recording a ``draft_kv`` report event with the
tokens its draft read, and one that comes back is prefilled again).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from afterburner.plugins import report
from afterburner.plugins.config import ConfigError, from_env
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang.tree_verify import FILLER_TOKEN, Drafts
from afterburner.spec_decode.draft.confident_chain import draft_chain
from afterburner.spec_decode.draft.draft_cache import DraftKV
from afterburner.spec_decode.draft.draft_tree import draft_topk
from afterburner.spec_decode.tree import TokenTree

logger = get_logger(__name__)

DEFAULT_DEPTH = 4  # drafts per step without --speculative-num-draft-tokens


@functools.lru_cache(maxsize=8)
def draft_vocab_size(draft_path: str | None) -> int:
    """The vocabulary size of the draft in ``--speculative-draft-model-path``, or one ``ConfigError`` line."""
    from transformers import AutoConfig

    if not draft_path:
        raise ConfigError("--speculative-algorithm AFTERBURNER_DRAFT needs --speculative-draft-model-path: a draft "
                          "model folder with the target's vocabulary (derive one with `afterburner models draft`)")
    try:
        return int(AutoConfig.from_pretrained(draft_path).vocab_size)
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--speculative-draft-model-path: {draft_path} is not a causal LM folder ({exc})") from None


def max_depth(server_args: Any) -> int:
    """How deep the draft drafts (argument checks, the user's process): as deep as the verified nodes reach."""
    draft_vocab_size(server_args.speculative_draft_model_path)
    speculative = from_env().speculative
    if speculative.draft_vocab:
        raise ConfigError("afterburner.speculative.draft_vocab: AFTERBURNER_DRAFT drafts from the draft model's whole "
                          "vocabulary; leave draft_vocab unset")
    if speculative.stop_threshold is not None and speculative.tree != "chain":
        raise ConfigError("afterburner.speculative.stop_threshold: AFTERBURNER_DRAFT cuts chains where the draft's "
                          "confidence falls; set tree to \"chain\" (or drop stop_threshold for a token tree)")
    num = server_args.speculative_num_draft_tokens
    return DEFAULT_DEPTH if num is None else max(num - 1, 1)


class DraftModelDrafter:
    """The draft (float32, on the target's device) and the tree it fills."""

    reads_tokens = True  # the worker hands ``propose`` each request's tokens and id

    def __init__(self, draft, tree: TokenTree, stop_threshold: float | None):
        self.draft = draft
        self.tree = tree
        self.stop_threshold = stop_threshold
        self.caches: dict[str, DraftKV] = {}  # request id -> its draft KV cache

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, roots: torch.Tensor, tokens: Sequence[Sequence[int]],
                request_ids: Sequence[str]) -> Drafts:
        """For each request, its tokens before the root and the root: the draft's top-T at each depth of its
        greedy chain after them, head_topk [B, D, T]; every request drafts the tree's full depth, or with a
        stop threshold its chain up to its first unconfident draft."""
        device, depth = roots.device, self.tree.depth
        contexts = [torch.tensor([*history, int(root)], dtype=torch.long, device=device)
                    for history, root in zip(tokens, roots.tolist(), strict=True)]
        # requests not in this batch (finished, retracted) drop their cache; the others keep and extend it
        for rid in self.caches.keys() - set(request_ids):
            kv = self.caches[rid]
            report.record("draft_kv", rid=rid, fed=kv.fed, whole=kv.whole, length=kv.ids.numel())
        self.caches = {rid: self.caches.get(rid) or DraftKV() for rid in request_ids}
        caches = [self.caches[rid] for rid in request_ids]
        if self.stop_threshold is None:
            rows = [draft_topk(self.draft, ids, depth, self.tree.topk, kv)
                    for ids, kv in zip(contexts, caches, strict=True)]
            depths = [depth] * len(rows)
        else:
            chains = [draft_chain(self.draft, ids, depth, self.stop_threshold, kv)[0]
                      for ids, kv in zip(contexts, caches, strict=True)]
            rows = [torch.tensor(chain + [FILLER_TOKEN] * (depth - len(chain)))[:, None] for chain in chains]
            depths = [len(chain) for chain in chains]
        head_topk = torch.stack(rows) if rows else torch.zeros(0, depth, self.tree.topk, dtype=torch.long)
        return Drafts(head_topk.to(device), torch.tensor(depths, dtype=torch.long, device=device))


def load_drafter(server_args: Any, runner: Any, tree: TokenTree) -> DraftModelDrafter:
    """In the scheduler: the draft on the target's device, checked against the target's vocabulary."""
    from transformers import AutoModelForCausalLM

    folder = server_args.speculative_draft_model_path
    ours, target = draft_vocab_size(folder), runner.model_config.vocab_size
    if ours != target:
        raise RuntimeError(f"--speculative-draft-model-path: a draft with a vocabulary of {ours} tokens does not fit "
                           f"the target's {target}")
    draft = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(runner.device).eval()
    threshold = from_env().speculative.stop_threshold
    logger.info("draft model: %s (%d layers), tree of %d nodes (depth %d, top-%d)%s", folder,
                draft.config.num_hidden_layers, tree.num_nodes, tree.depth, tree.topk,
                "" if threshold is None else f", chains cut below draft probability {threshold}")
    return DraftModelDrafter(draft, tree, threshold)
