"""Medusa with a token tree in vLLM: afterburner's proposer, tree verification and acceptance rules behind
vLLM's own ``--speculative-config '{"method": "medusa", "model": HEADS, "num_speculative_tokens": N}'``.

vLLM schedules N draft tokens after each request's last token and verifies them as a chain. To verify a
tree in that same slot, afterburner's patches (``afterburner.patches.vllm_medusa``) change four things:

1. the proposer (``GPUModelRunner.__init__``): heads -> top-k per head -> the tree's N node tokens, in node
   order (ancestors first, so vLLM cutting a draft short still leaves a tree);
2. positions (``_prepare_inputs``): node i sits at root position + its depth (RoPE), while its KV goes to
   the i-th slot after the root as vLLM laid out; the attention Impl
   (``sparse_attention.SelectiveCPUAttentionImpl``) reads ``STEP`` and applies the tree mask;
3. acceptance (``RejectionSampler.forward``): afterburner's rule picks the accepted path and rewrites the
   sampled tokens (accepted drafts, then the bonus token; -1 after);
4. bookkeeping (``propose_draft_token_ids``): before the next proposal, the accepted nodes' KV entries move
   to the slots right after the root (vLLM keeps the first ``accepted`` slots), and the hidden state that
   vLLM hands the heads becomes the last accepted node's.

With ``tree: "chain"`` steps 2 and 4 are identities and vLLM's chain layout is used unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.spec_decode.medusa import MedusaProposer

from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm.hooks import config_of
from afterburner.spec_decode.medusa import acceptance
from afterburner.spec_decode.medusa.checkpoint import load_heads, load_shared_lm_head
from afterburner.spec_decode.medusa.choices import tree_paths
from afterburner.spec_decode.medusa.tree import MedusaTree, build_tree

logger = get_logger(__name__)
PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID in sampled_token_ids


@dataclass
class TreeStep:
    """One verification step: batch row -> (first query token, tree tokens incl. the root)."""

    drafter: "AfterburnerMedusaProposer"
    num_tokens: int
    num_reqs: int
    rows: dict[int, tuple[int, int]]
    accepted: dict[int, list[int]] = field(default_factory=dict)  # row -> accepted node indices (root first)


# The step in flight in this process (vLLM runs one step at a time per runner; async scheduling is off
# for Medusa). Set by ``on_prepare_inputs``, read by the attention Impl, cleared after the proposal.
STEP: TreeStep | None = None
# Statistics of this process: verification steps and tokens emitted per request-step (the benchmark and
# the demo read them through ``afterburner.plugins.report``).
STATS = {"request_steps": 0, "accepted_drafts": 0}


class AfterburnerMedusaProposer(MedusaProposer):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.settings = config_of(vllm_config).medusa
        self.heads = None
        self.lm_head_weight: torch.Tensor | None = None
        self._trees: dict[int, MedusaTree] = {}
        self.layout_checked = False

    @property
    def is_tree(self) -> bool:
        return self.settings.tree != "chain"

    def load_model(self, target_model) -> None:
        folder = self.spec_config.model
        self.heads = load_heads(folder, dtype=torch.float32).eval()
        if self.heads.config.shared_lm_head:
            stored = load_shared_lm_head(folder)
            weight = stored if stored is not None else target_model.lm_head.weight
            self.lm_head_weight = weight.detach()[: self.heads.config.vocab_size].float()
        paths = tree_paths(self.settings.tree, num_heads=self.heads.config.num_heads,
                           num_drafts=self.num_speculative_tokens)
        full = build_tree(paths, num_heads=self.heads.config.num_heads)
        self._trees = {len(full.choices) + 1: full}
        logger.info("medusa: %d heads from %s, tree of %d nodes (depth %d, top-%d), %s acceptance",
                    self.heads.config.num_heads, folder, full.num_nodes, full.depth, full.topk,
                    self.settings.acceptance)

    def tree(self, num_nodes: int) -> MedusaTree:
        """The tree of the first ``num_nodes`` nodes (root included): what vLLM scheduled this step."""
        if num_nodes not in self._trees:
            full = self._trees[max(self._trees)]
            self._trees[num_nodes] = build_tree(full.choices[: num_nodes - 1], num_heads=self.heads.config.num_heads,
                                                topk=full.topk)
        return self._trees[num_nodes]

    @torch.inference_mode()
    def propose(self, num_speculative_tokens, target_hidden_states, sampling_metadata, slot_mappings=None):
        full = self._trees[max(self._trees)]
        logits = self.heads(target_hidden_states.float(), self.lm_head_weight)  # [K, B, V]
        top = logits[: full.depth].topk(full.topk, dim=-1).indices  # [depth, B, topk]
        batch = target_hidden_states.shape[0]
        flat = torch.cat([torch.zeros(batch, 1, dtype=top.dtype), top.permute(1, 0, 2).reshape(batch, -1)], 1)
        return flat[:, full.candidate_index[1:]][:, :num_speculative_tokens]

    def dummy_run(self, num_tokens: int) -> None:  # the heads are plain torch: nothing to warm up
        return None

    def accept(self, tree: MedusaTree, node_tokens: torch.Tensor, node_logits: torch.Tensor, temperature: float,
               generator: torch.Generator | None) -> acceptance.Accepted:
        if self.settings.acceptance == "typical":
            return acceptance.typical_accept(tree, node_tokens, node_logits, temperature=temperature,
                                             epsilon=self.settings.typical_epsilon,
                                             delta=self.settings.typical_delta, generator=generator)
        if temperature == 0:
            return acceptance.greedy_accept_nodes(tree, node_tokens, node_logits)
        return acceptance.rejection_accept(tree, node_tokens, node_logits, temperature=temperature,
                                           generator=generator)


def _ours(runner) -> AfterburnerMedusaProposer | None:
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, AfterburnerMedusaProposer) else None


def on_runner_init(result, self, *args, **kwargs) -> None:
    """After ``GPUModelRunner.__init__``: vLLM's Medusa proposer -> afterburner's."""
    spec = self.speculative_config
    if spec is not None and spec.method == "medusa" and config_of(self.vllm_config).enabled:
        self.drafter = AfterburnerMedusaProposer(self.vllm_config, self.device)


def on_prepare_inputs(result, self, scheduler_output, num_scheduled_tokens) -> None:
    """After ``_prepare_inputs``: tree positions for the rows that carry drafts; publish the step."""
    global STEP
    runner = self
    drafter = _ours(runner)
    spec_metadata = result[1]
    if drafter is None or spec_metadata is None:
        STEP = None
        return
    starts = runner.query_start_loc.np
    rows = {}
    for row, num_drafts in enumerate(spec_metadata.num_draft_tokens):
        if num_drafts > 0:
            rows[row] = (int(starts[row + 1]) - num_drafts - 1, num_drafts + 1)
    if drafter.is_tree:
        if not drafter.layout_checked:  # layers learn their kernel ISA after load_model, with the KV cache
            check_kv_layout(runner.vllm_config)
            drafter.layout_checked = True
        for start, size in rows.values():
            depth = drafter.tree(size).position_offsets
            runner.positions[start:start + size] = runner.positions[start] + depth
    num_reqs = runner.input_batch.num_reqs
    STEP = TreeStep(drafter, int(starts[num_reqs]), num_reqs, rows)


def on_rejection_sample(output, self, metadata, draft_probs, logits, sampling_metadata) -> None:
    """After ``RejectionSampler.forward``: afterburner's acceptance over each row's tree, written into the
    sampler output in place (vLLM reads accepted drafts + bonus, up to the first -1)."""
    runner_step = STEP
    if runner_step is None:
        return
    drafter = runner_step.drafter
    sampled = output.sampled_token_ids
    ends = metadata.cu_num_sampled_tokens.tolist()
    draft_ids = metadata.draft_token_ids
    draft_ends = metadata.cu_num_draft_tokens.tolist()
    temperatures = None if sampling_metadata.all_greedy else sampling_metadata.temperature.tolist()
    generators = sampling_metadata.generators
    for row, (start_token, size) in runner_step.rows.items():
        tree = drafter.tree(size)
        node_logits = logits[ends[row] - size:ends[row]].float()
        node_tokens = torch.cat([torch.tensor([PLACEHOLDER]), draft_ids[draft_ends[row] - (size - 1):draft_ends[row]].long()])
        temperature = 0.0 if temperatures is None else float(temperatures[row])
        temperature = 0.0 if temperature < 1e-5 else temperature  # vLLM's greedy threshold
        result = drafter.accept(tree, node_tokens, node_logits, temperature, generators.get(row))
        sampled[row].fill_(PLACEHOLDER)
        sampled[row, : len(result.tokens)] = torch.tensor(result.tokens, dtype=sampled.dtype)
        runner_step.accepted[row] = acceptance.accepted_nodes(tree, result).tolist()
        STATS["request_steps"] += 1
        STATS["accepted_drafts"] += result.length


def on_propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
               aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings=None) -> None:
    """Before ``propose_draft_token_ids``: move accepted nodes' KV and hidden states where vLLM expects
    the accepted chain (slot / row ``root + j`` for the j-th accepted draft)."""
    global STEP
    step, STEP = STEP, None
    runner = self
    drafter = _ours(runner)
    if step is None or drafter is None or not drafter.is_tree:
        return
    slots = common_attn_metadata.slot_mapping
    src, dst, hidden_src, hidden_dst = [], [], [], []
    row_offset = 0  # rows of sample_hidden_states: each drafting request has size rows, others 1
    for row in range(step.num_reqs):
        start, size = step.rows.get(row, (None, 1))
        nodes = step.accepted.get(row)
        if nodes is not None and nodes != list(range(len(nodes))):
            src += [int(slots[start + n]) for n in nodes[1:]]
            dst += [int(slots[start + j]) for j in range(1, len(nodes))]
            hidden_src.append(row_offset + nodes[-1])
            hidden_dst.append(row_offset + len(nodes) - 1)
        row_offset += size
    if hidden_src:
        sample_hidden_states[hidden_dst] = sample_hidden_states[hidden_src]
    if src:
        move_kv(runner, torch.tensor(src), torch.tensor(dst))


def _attention_layers(vllm_config):
    return [layer for layer in vllm_config.compilation_config.static_forward_context.values()
            if hasattr(layer, "kv_cache")]


def check_kv_layout(vllm_config) -> None:
    """Tree verification moves KV entries itself: only cache layouts afterburner has verified."""
    from afterburner.plugins.vllm.sparse_attention import KV_VIEWS

    unknown = {getattr(layer, "isa", None) for layer in _attention_layers(vllm_config)} - set(KV_VIEWS)
    if unknown:
        raise RuntimeError(f"afterburner medusa: a token tree needs a KV layout afterburner knows ({sorted(KV_VIEWS)}), "
                           f"this engine uses {sorted(map(str, unknown))}; set afterburner.medusa.tree to \"chain\"")


def move_kv(runner, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the KV entries of token slots ``src`` to ``dst`` in every attention layer's cache."""
    from afterburner.plugins.vllm.sparse_attention import KV_VIEWS

    for layer in _attention_layers(runner.vllm_config):
        views = KV_VIEWS[layer.isa]
        cache = layer.kv_cache
        cache = cache[0] if isinstance(cache, list) else cache
        keys, values = views(cache)
        block_size = keys.shape[1]
        for part in (keys, values):
            part[dst // block_size, dst % block_size] = part[src // block_size, src % block_size].clone()
