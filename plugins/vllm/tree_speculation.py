"""Tree speculation in vLLM, generic over afterburner's proposers (``proposers.PROPOSERS``), behind vLLM's
own ``--speculative-config '{"method": M, "model": DIR, "num_speculative_tokens": N}'``.

vLLM schedules N draft tokens after each request's last token and verifies them as a chain. To verify a
tree in that same slot, afterburner's patches (``afterburner.patches.vllm_tree_speculation``) change four
things:

1. the proposer (``GPUModelRunner.__init__``): vLLM's drafter -> afterburner's for method M, which drafts
   the tree's N node tokens in node order (ancestors first, so vLLM cutting a draft short still leaves a
   tree);
2. positions (``_prepare_inputs``): node i sits at root position + its depth (RoPE), while its KV goes to
   the i-th slot after the root as vLLM laid out; the step (``verify_step.VerifyStep``) goes to the
   attention metadata builders, so the attention Impl applies the tree mask;
3. acceptance (``RejectionSampler.forward``): afterburner's rule (``spec_decode.acceptance.accept_tree``)
   picks the accepted path and rewrites the sampled tokens (accepted drafts, then the bonus token; -1 after);
4. bookkeeping (``propose_draft_token_ids``): before the next proposal, the accepted nodes' KV entries move
   to the slots right after the root (vLLM keeps the first ``accepted`` slots), the step's token ids and
   positions become the accepted chain's for a proposer that re-reads them (a draft model), and the hidden
   state that vLLM hands the proposer becomes the last accepted node's.

With ``speculative.tree: "chain"`` steps 2 and 4 are identities and vLLM's chain layout is used unchanged.
A proposer is a vLLM proposer class mixed with ``TreeProposer``: it sets ``full_tree`` in ``load_model``
and drafts in node order.

A hidden-state drafter on vLLM's ``custom_class`` route (``hamburger_proposer``: a chain, vLLM's own
verification) uses two of these points: at runner init the runner is told to collect the target layers the
drafter reads (vLLM's EAGLE-3 aux hidden states), and before each proposal the drafter gets those layers'
states at every request's last accepted position.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from afterburner.plugins import stats
from afterburner.plugins.vllm import kv_layout, proposers
from afterburner.plugins.vllm.config_access import config_of
from afterburner.plugins.vllm.verify_step import VerifyStep, hand_to_builders
from afterburner.spec_decode import acceptance
from afterburner.spec_decode.tree import TokenTree, build_tree

PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID in sampled_token_ids


class TreeProposer:
    """What the runner hooks need of a proposer, and the state they keep on it (not on vLLM's runner)."""

    # whether the proposer re-reads the verification step's token ids and positions (a draft model catching
    # its KV cache up): then the bookkeeping lays each tree row out as its accepted chain first
    reads_step_tokens = False

    def init_tree_state(self, vllm_config) -> None:
        self.settings = config_of(vllm_config).speculative
        self.full_tree: TokenTree | None = None  # set by load_model
        self._trees: dict[int, TokenTree] = {}
        self.step: VerifyStep | None = None  # the verification step in flight
        self.layout_checked = False

    @property
    def is_tree(self) -> bool:
        return self.settings.tree != "chain"

    def tree(self, num_nodes: int) -> TokenTree:
        """The tree of the first ``num_nodes`` nodes (root included): what vLLM scheduled this step."""
        full = self.full_tree
        if num_nodes == full.num_nodes:
            return full
        if num_nodes not in self._trees:
            self._trees[num_nodes] = build_tree(full.choices[: num_nodes - 1], max_depth=full.depth, topk=full.topk)
        return self._trees[num_nodes]

    def accept(self, tree: TokenTree, node_tokens: torch.Tensor, node_logits: torch.Tensor, temperature: float,
               generator: torch.Generator | None) -> acceptance.Accepted:
        s = self.settings
        return acceptance.accept_tree(tree, node_tokens, node_logits, rule=s.acceptance, temperature=temperature,
                                      generator=generator, epsilon=s.typical_epsilon, delta=s.typical_delta)


# RejectionSampler -> the proposer of the runner that owns it (the acceptance hook sees only the sampler)
_proposer_of_sampler: WeakKeyDictionary = WeakKeyDictionary()


def _ours(runner) -> TreeProposer | None:
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, TreeProposer) else None


def on_runner_init(result, self, *args, **kwargs) -> None:
    """After ``GPUModelRunner.__init__``: vLLM's proposer -> afterburner's, for the methods it registers."""
    spec = self.speculative_config
    if spec is not None and proposers.replaces_vllm_proposer(spec.method, config_of(self.vllm_config)):
        self.drafter = proposers.build_proposer(spec.method, self.vllm_config, self.device)
    sampler = getattr(self, "rejection_sampler", None)
    # ours, replacing vLLM's or built by vLLM's custom_class route; others keep vLLM's acceptance
    if sampler is not None and isinstance(getattr(self, "drafter", None), TreeProposer):
        _proposer_of_sampler[sampler] = self.drafter
    layers = _feature_layers(getattr(self, "drafter", None))
    if spec is not None and layers:  # the runner collects these layers' hidden states (vLLM's EAGLE-3 route)
        self.use_aux_hidden_state_outputs = True
        self._get_eagle3_aux_layers_from_config = lambda: layers


def _feature_layers(drafter) -> tuple[int, ...] | None:
    """The target layers a hidden-state drafter reads (``hamburger_proposer``), None for other drafters."""
    return tuple(drafter.feature_layers) if hasattr(drafter, "set_features") else None


def last_accepted_rows(query_starts, sampled_token_ids: list[list[int]],
                       num_draft_tokens) -> tuple[list[int], list[bool]]:
    """Row of the flattened step whose output each request's last sampled token came from: the root
    (the request's last ``drafts + 1`` rows start with it) plus the accepted drafts. A request that sampled
    nothing (a prefill chunk short of the prompt's end) is marked False."""
    rows, sampled = [], []
    for i, tokens in enumerate(sampled_token_ids):
        drafts = int(num_draft_tokens[i]) if num_draft_tokens is not None else 0
        rows.append(int(query_starts[i + 1]) - 1 - drafts + max(len(tokens) - 1, 0))
        sampled.append(bool(tokens))
    return rows, sampled


def _hand_features(runner, drafter, sampled_token_ids, aux_hidden_states, spec_decode_metadata) -> None:
    if aux_hidden_states is None or not isinstance(sampled_token_ids, list):
        drafter.set_features(None, [])
        return
    num_drafts = None if spec_decode_metadata is None else spec_decode_metadata.num_draft_tokens
    rows, sampled = last_accepted_rows(runner.query_start_loc.np, sampled_token_ids, num_drafts)
    index = torch.tensor(rows, dtype=torch.long, device=aux_hidden_states[0].device)
    drafter.set_features(torch.stack([h[index] for h in aux_hidden_states], dim=1), sampled)


def on_prepare_inputs(result, self, scheduler_output, num_scheduled_tokens) -> None:
    """After ``_prepare_inputs``: tree positions for the rows that carry drafts; hand the step to attention."""
    runner = self
    drafter = _ours(runner)
    spec_metadata = result[1]
    if drafter is None:
        return
    if spec_metadata is None:
        drafter.step = None
        hand_to_builders(runner, None)
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
    largest = drafter.tree(max((size for _, size in rows.values()), default=drafter.full_tree.num_nodes))
    drafter.step = VerifyStep(int(starts[num_reqs]), num_reqs, rows, largest.attn_mask)
    hand_to_builders(runner, drafter.step if drafter.is_tree else None)


def on_rejection_sample(output, self, metadata, draft_probs, logits, sampling_metadata) -> None:
    """After ``RejectionSampler.forward``: afterburner's acceptance over each row's tree, written into the
    sampler output in place (vLLM reads accepted drafts + bonus, up to the first -1)."""
    drafter = _proposer_of_sampler.get(self)
    step = None if drafter is None else drafter.step
    if step is None:
        return
    sampled = output.sampled_token_ids
    ends = metadata.cu_num_sampled_tokens.tolist()
    draft_ids = metadata.draft_token_ids
    draft_ends = metadata.cu_num_draft_tokens.tolist()
    temperatures = None if sampling_metadata.all_greedy else sampling_metadata.temperature.tolist()
    generators = sampling_metadata.generators
    for row, (_, size) in step.rows.items():
        tree = drafter.tree(size)
        node_logits = logits[ends[row] - size:ends[row]].float()
        drafts = draft_ids[draft_ends[row] - (size - 1):draft_ends[row]].long()
        node_tokens = torch.cat([torch.tensor([PLACEHOLDER]), drafts])
        temperature = 0.0 if temperatures is None else float(temperatures[row])
        temperature = 0.0 if temperature < 1e-5 else temperature  # vLLM's greedy threshold
        result = drafter.accept(tree, node_tokens, node_logits, temperature, generators.get(row))
        sampled[row].fill_(PLACEHOLDER)
        sampled[row, : len(result.tokens)] = torch.tensor(result.tokens, dtype=sampled.dtype)
        step.accepted[row] = acceptance.accepted_nodes(tree, result).tolist()
        stats.SPECULATION.request_steps += 1
        stats.SPECULATION.accepted_drafts += result.length
        if output.logprobs_tensors is not None:
            _path_logprobs(self, output.logprobs_tensors, logits, row, sampled.shape[1],
                           [ends[row] - size + node for node in step.accepted[row]], result.tokens)


def drafts_tree(runner) -> bool:
    """Whether the runner's drafter is afterburner's, drafting token trees."""
    drafter = _ours(runner)
    return drafter is not None and drafter.is_tree


def row_tree(runner, row: int) -> TokenTree | None:
    """The token tree row ``row`` of the step in flight verifies (None: a chain, or not afterburner's)."""
    drafter = _ours(runner)
    step = None if drafter is None else drafter.step
    if step is None or not drafter.is_tree or row not in step.rows:
        return None
    return drafter.tree(step.rows[row][1])


def reaccept(runner, row: int, nodes: list[int]) -> None:
    """Another verifier (AWRS, ``awrs_speculative``) kept ``nodes`` of row ``row``'s tree or chain after
    ``on_rejection_sample``: the bookkeeping moves these and the counters count these (no-op for rows
    afterburner's acceptance did not verify)."""
    drafter = _ours(runner)
    step = None if drafter is None else drafter.step
    if step is None or row not in step.accepted:
        return
    stats.SPECULATION.accepted_drafts += len(nodes) - len(step.accepted[row])
    stats.SPECULATION.constrained_rerouted += drafter.is_tree and not set(nodes) <= set(step.accepted[row])
    step.accepted[row] = list(nodes)


def _path_logprobs(sampler, tensors, logits: torch.Tensor, row: int, width: int, positions: list[int],
                   tokens: list[int]) -> None:
    """vLLM computed the row's log-probs at its chain's positions for its own tokens; a tree's accepted
    path has other nodes and tokens: token j was drawn from node ``positions[j]``'s logits (``logits``:
    the step's raw logits, [positions, V]). Rewritten in place (rows ``row * width + j`` of vLLM's
    flattened [num_reqs, width] layout). Processed-logprob modes keep vLLM's values."""
    if sampler.is_processed_logprobs_mode:
        return
    raw = logits[positions].float()
    values = raw if sampler.is_logits_logprobs_mode else sampler.sampler.compute_logprobs(raw)
    gathered = sampler.sampler.gather_logprobs(values, tensors.logprob_token_ids.shape[1] - 1,
                                               torch.tensor(tokens, dtype=torch.int64))
    flat = row * width + torch.arange(len(tokens))
    tensors.logprob_token_ids[flat] = gathered.logprob_token_ids.to(tensors.logprob_token_ids.dtype)
    tensors.logprobs[flat] = gathered.logprobs.to(tensors.logprobs.dtype)
    tensors.selected_token_ranks[flat] = gathered.selected_token_ranks.to(tensors.selected_token_ranks.dtype)


def on_propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
               aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings=None) -> None:
    """Before ``propose_draft_token_ids``: move accepted nodes' KV and hidden states (and the target
    features a hidden-state drafter reads) where vLLM expects the accepted chain (slot / row ``root + j`` for
    the j-th accepted draft); then hand a hidden-state drafter its features."""
    runner = self
    drafter = _ours(runner)
    step = None
    if drafter is not None:
        step, drafter.step = drafter.step, None
    if step is not None and drafter.is_tree:
        _as_accepted_chain(runner, drafter, step, sample_hidden_states, aux_hidden_states,
                           common_attn_metadata.slot_mapping)
    if _feature_layers(getattr(runner, "drafter", None)):
        _hand_features(runner, runner.drafter, sampled_token_ids, aux_hidden_states, spec_decode_metadata)


def _as_accepted_chain(runner, drafter: TreeProposer, step: VerifyStep, sample_hidden_states, aux_hidden_states,
                       slots) -> None:
    src, dst, hidden_src, hidden_dst, aux_src, aux_dst = [], [], [], [], [], []
    row_offset = 0  # rows of sample_hidden_states: each drafting request has size rows, others 1
    for row in range(step.num_reqs):
        start, size = step.rows.get(row, (None, 1))
        nodes = step.accepted.get(row)
        if start is not None and drafter.reads_step_tokens:
            _as_chain(runner, start, size, nodes)
        if nodes is not None and nodes != list(range(len(nodes))):
            src += [int(slots[start + n]) for n in nodes[1:]]
            dst += [int(slots[start + j]) for j in range(1, len(nodes))]
            hidden_src.append(row_offset + nodes[-1])
            hidden_dst.append(row_offset + len(nodes) - 1)
            aux_src.append(start + nodes[-1])  # aux hidden states: one row per scheduled token
            aux_dst.append(start + len(nodes) - 1)
        row_offset += size
    if hidden_src:
        sample_hidden_states[hidden_dst] = sample_hidden_states[hidden_src]
    if aux_src and aux_hidden_states:  # the target features a hidden-state drafter reads next
        for states in aux_hidden_states:
            states[aux_dst] = states[aux_src]
    if src:
        kv_layout.move_kv(runner.vllm_config, torch.tensor(src), torch.tensor(dst))


def _as_chain(runner, start: int, size: int, nodes: list[int] | None) -> None:
    """The step's token ids and positions of one tree row as vLLM's chain layout has them: the accepted
    path's tokens right after the root, positions root + j. A drafter that re-reads the step's tokens (a
    draft model catching its KV cache up) then sees the accepted chain; the rows after it are rejected
    slots, as after a chain step."""
    positions = runner.positions
    positions[start:start + size] = positions[start] + torch.arange(size, dtype=positions.dtype,
                                                                    device=positions.device)
    if nodes:
        ids = runner.input_ids.gpu
        ids[start:start + len(nodes)] = ids[start + torch.tensor(nodes, device=ids.device)]


def check_kv_layout(vllm_config) -> None:
    """Tree verification moves KV entries itself: only cache layouts afterburner has verified."""
    unknown = kv_layout.unknown_layouts(vllm_config)
    if unknown:
        raise RuntimeError(f"afterburner: a token tree needs a KV layout afterburner knows "
                           f"({sorted(kv_layout.KV_VIEWS)}), this engine uses {unknown}; set "
                           "afterburner.speculative.tree to \"chain\"")
