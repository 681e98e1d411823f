"""The SGLang worker for afterburner's speculative algorithms (design: ``spec_algorithms``), generic over
the drafter (``proposers.PROPOSERS``: ``load_drafter`` gives an object with ``propose(hidden [B, X], roots
[B]) -> Drafts``: candidate tokens per depth and how deep each request's reach).

One call of ``forward_batch_generation`` per scheduler step, synchronously (overlap is off):
- prefill: the target's forward as usual, capturing each request's last hidden state (the final layer's,
  or the layers a drafter asked SGLang to capture); the drafter's proposal from it and the sampled token
  become the request's ``TreeCarry``;
- decode: the carried tokens fill the tree (``TreeVerifier``), the target verifies all B x N nodes in
  one TARGET_VERIFY pass, and SGLang's own verify does the rest: ``eagle_sample`` accepts a path (plus
  the target's bonus token), ``move_accept_tokens_to_target_kvcache`` moves the accepted nodes' KV to
  the front of the request's verify window. The drafter then reads the hidden state of the last accepted
  node, which produced the bonus token: the next tree's root.

On CPU with ``torch_native`` the verify forward runs afterburner's tree attention (``verify_attention``), and
batches with sampled requests are verified by ``sampled_verify`` (SGLang's CPU verify is greedy only). Run on
CPU (``tests/sglang/test_sglang_speculative_engine.py``); never on a GPU (the lent GPU machine has no SGLang).
The path mirrors SGLang 0.5.23's ``NGRAMWorker``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import torch
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
from sglang.srt.layers.logprob_processor import compute_spec_logprobs
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.runtime_context import get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.eagle_utils import eagle_sample
from sglang.srt.speculative.spec_utils import (
    GrammarTree,
    build_grammar_vocab_mask,
    commit_mamba_states_after_verify,
    move_accept_tokens_to_target_kvcache,
    prepare_mamba_track_for_verify,
    record_stream_for_v2_verify,
)

from afterburner.plugins.config import from_env
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang import proposers, sampled_verify
from afterburner.plugins.sglang.spec_checks import attention_backends, cpu_blocker, proposer_tree
from afterburner.plugins.sglang.tree_verify import TreeCarry, TreeVerifier
from afterburner.plugins.sglang.verify_attention import enable_tree_verify

logger = get_logger(__name__)


class TreeSpecWorker(BaseSpecWorker):
    def __init__(self, server_args: Any, gpu_id: int, nccl_port: int, target_worker: Any):
        super().__init__()
        runner = target_worker.model_runner
        algorithm = proposers.canonical(str(server_args.speculative_algorithm))
        problem = cpu_blocker(algorithm, str(runner.device), *attention_backends(server_args))
        if problem:
            raise RuntimeError(problem)
        self._target_worker = target_worker
        self.device = runner.device
        self.on_cpu = torch.device(self.device).type == "cpu"
        self.torch_verify = self.on_cpu and attention_backends(server_args)[0] == "torch_native"
        tree = proposer_tree(server_args, get_spec().speculative_num_draft_tokens, from_env())
        self.drafter = proposers.proposer_module(algorithm).load_drafter(server_args, runner, tree)
        self.reads_tokens = getattr(self.drafter, "reads_tokens", False)
        self.verifier = TreeVerifier(tree, self.device)
        self.num_nodes = tree.num_nodes
        self.full_mask = not self.on_cpu  # SGLang's NGRAM worker's mask layout
        self.algorithm = algorithm
        self.refused_sampled = 0  # sampled requests refused on CPU (sampled_verify.unsupported)
        self.generator = torch.Generator().manual_seed(server_args.random_seed or 0)  # CPU sampled verification

    def init_attention_backends(self):
        """After the target's backends exist: on CPU with torch_native, verify forwards take afterburner's path."""
        super().init_attention_backends()
        if self.torch_verify:
            enable_tree_verify(self.target_worker.model_runner.attn_backend)

    @property
    def draft_worker(self) -> None:
        return None  # no SGLang draft worker: the drafter runs here

    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        fwd_stream = torch.get_device_module(self.device).current_stream()
        record_stream_for_v2_verify(batch, None, fwd_stream)
        if batch.forward_mode.is_decode():
            return self._verify(batch, on_publish)
        return self._prefill(batch, on_publish, pp_proxy_tensors)

    def _prefill(self, batch, on_publish, pp_proxy_tensors) -> GenerationBatchResult:
        if self.on_cpu:
            self._refuse_sampled(batch)
        result = self.target_worker.forward_batch_generation(batch, pp_proxy_tensors=pp_proxy_tensors,
                                                             capture_hidden_mode=CaptureHiddenMode.LAST)
        drafts = self._propose(batch, result.logits_output.hidden_states, result.next_token_ids)
        new_seq_lens = batch.seq_lens.clone()  # V2: committed length, without the sampled token
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=result.logits_output,
            next_token_ids=result.next_token_ids,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=torch.ones(len(batch.reqs), dtype=torch.int32, device=self.device),
            new_seq_lens=new_seq_lens,
            next_draft_input=TreeCarry(result.next_token_ids, drafts, new_seq_lens),
            speculative_num_draft_tokens=self.num_nodes,
        )

    def _verify(self, batch, on_publish) -> GenerationBatchResult:
        carry: TreeCarry = batch.spec_info
        bs, n = len(batch.reqs), self.num_nodes
        tokens = self.verifier.tree_tokens(carry.roots, carry.drafts.head_topk)  # [B, N]
        lengths = (batch.seq_lens if batch.seq_lens_cpu is None else batch.seq_lens_cpu).tolist()
        verify_input = self.verifier.verify_input(tokens, batch.seq_lens, lengths, depths=carry.drafts.depths,
                                                 prefix_in_mask=self.full_mask)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = verify_input.draft_token
        batch.out_cache_loc = assign_extend_cache_locs_func(  # the slots the scheduler reserved after L_b
            req_pool_indices=batch.req_pool_indices, req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens, end_offset=batch.seq_lens + n, batch_size=bs, draft_token_num=n,
            device=self.device)
        prepare_mamba_track_for_verify(batch)
        batch.spec_info = verify_input
        result = self.target_worker.forward_batch_generation(batch, is_verify=True,
                                                             capture_hidden_mode=CaptureHiddenMode.FULL)
        logits_output = result.logits_output
        grammar_mask = self._grammar_mask(batch, verify_input) if batch.has_grammar else None
        if self.on_cpu and not batch.sampling_info.is_all_greedy:  # SGLang's CPU verify would take the argmax
            predict, accept_lens, accept_index = self._sampled_accept(batch, verify_input, carry, logits_output,
                                                                      grammar_mask)
        else:
            predict, accept_lens, accept_index = eagle_sample(  # accept_index [B, D + 1]: root first, -1 after
                verify_input, batch, logits_output, grammar_mask,
                watermark_state=self.target_worker.model_runner.watermark_state)
        commit_mamba_states_after_verify(self.target_worker, batch, accept_lens, accept_index, n)
        move_accept_tokens_to_target_kvcache(batch, accept_index, accept_lens - 1,
                                             self.token_to_kv_pool_allocator)
        if batch.return_logprob:
            compute_spec_logprobs(batch, logits_output, predict, accept_index=accept_index)
        new_seq_lens = batch.seq_lens + accept_lens
        if on_publish is not None:
            on_publish(new_seq_lens)
        # the last accepted node of each request, as a row of the B*N verify tokens: [B]
        last = accept_index.gather(1, (accept_lens - 1).long()[:, None]).squeeze(1).long()
        roots = predict[last]
        accepted = None  # the tokens each request emitted before its new root (what a draft model reads)
        if self.reads_tokens:
            accepted = [predict[row[: count - 1]].tolist()
                        for row, count in zip(accept_index, accept_lens.tolist(), strict=True)]
        drafts = self._propose(batch, logits_output.hidden_states[last], roots, accepted)
        batch.forward_mode = ForwardMode.DECODE
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=predict[accept_index].flatten(),  # row b: its accept_lens[b] new tokens first
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=TreeCarry(roots, drafts, new_seq_lens),
            speculative_num_draft_tokens=n,
        )

    def _propose(self, batch, hidden, roots, accepted=None):
        """The drafter's proposal from the hidden states at each request's root; a drafter that
        ``reads_tokens`` (a draft model) also gets each request's tokens before its root: what SGLang holds
        (prompt and output so far) and the drafts this step accepted (``accepted``, not in ``output_ids`` yet),
        and its request id (a drafter's cache per request)."""
        if not self.reads_tokens:
            return self.drafter.propose(hidden, roots)
        accepted = accepted or [[] for _ in batch.reqs]
        tokens = [[*req.origin_input_ids, *req.output_ids, *more] for req, more in zip(batch.reqs, accepted,
                                                                                        strict=True)]
        return self.drafter.propose(hidden, roots, tokens, [req.rid for req in batch.reqs])

    def _refuse_sampled(self, batch) -> None:
        """On CPU sampled requests are verified by ``sampled_verify``, which does not reproduce SGLang's top-k /
        top-p / min-p or seeds: a sampled request that sets one fails alone, after its prefill, with one line
        (the rest of the batch goes on)."""
        if batch.sampling_info.is_all_greedy:
            return
        for req in batch.reqs:
            settings = sampled_verify.unsupported(req) if sampled_verify.is_sampled(req) else None
            if settings:
                message = (f"--speculative-algorithm {self.algorithm} on CPU verifies sampled requests by temperature "
                           f"alone: this request sets {settings}; leave them unset, send temperature 0, or use a "
                           "server without speculation")
                req.to_finish = FINISH_ABORT(message, HTTPStatus.BAD_REQUEST, "BadRequestError")
                self.refused_sampled += 1
                if self.refused_sampled == 1:
                    logger.warning("%s (counted from now on: TreeSpecWorker.refused_sampled)", message)

    def _sampled_accept(self, batch, verify_input, carry, logits_output, grammar_mask):
        """``eagle_sample``'s outputs from afterburner's lossless acceptance (``sampled_verify``)."""
        bs, n = len(batch.reqs), self.num_nodes
        logits = sampled_verify.adjusted_logits(logits_output.next_token_logits, batch, n, grammar_mask)
        temperatures = [float(t) if sampled_verify.is_sampled(req) else 0.0
                        for req, t in zip(batch.reqs, batch.sampling_info.temperatures.view(-1).tolist(), strict=True)]
        out = sampled_verify.sampled_accept(self.verifier.tree, verify_input.draft_token.view(bs, n).cpu(),
                                            logits.cpu(), carry.drafts.depths.tolist(), temperatures, self.generator)
        return tuple(t.to(self.device) for t in out)

    def _grammar_mask(self, batch, verify_input):
        """Constrained requests: SGLang's vocabulary mask over each request's (cut) tree, as its NGRAM worker
        builds it."""
        bs, n = len(batch.reqs), verify_input.draft_token_num
        tree = GrammarTree.from_host(verify_input.retrieve_next_token.cpu(), verify_input.retrieve_next_sibling.cpu(),
                                     verify_input.draft_token.view(bs, n).cpu().long())
        return build_grammar_vocab_mask(reqs=batch.reqs, tree=tree, sampling_info=batch.sampling_info,
                                        device=self.device, barrier=None)
