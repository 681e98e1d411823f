"""``--speculative-algorithm AFTERBURNER_MEDUSA`` on the real sglang modules: SGLang's plugin loader
registers it (and the alias MEDUSA); the real parser and SGLang's argument resolution accept it and apply
Medusa's defaults; bad settings stop resolution (and ``sglang.Engine``, before any subprocess) with one line;
the worker class and its future map build; and the draft stage puts the heads' top-k into the tree and lays
it out as SGLang's ``NgramVerifyInput`` with the links SGLang's own derivation gives.

Engine runs (verify steps, greedy output, acceptance): ``test_sglang_speculative_engine.py``."""

import multiprocessing

import numpy as np
import pytest
import torch
from engine_setup import ENGINE_KWARGS
from safetensors.torch import load_file
from spec_args import assert_refused, assert_registered, resolve

from afterburner.plugins.config import ConfigError, parse_config
from afterburner.plugins.sglang import medusa, spec_algorithms, spec_checks
from afterburner.plugins.sglang.tree_verify import Drafts, TreeCarry, TreeVerifier, tree_links
from afterburner.spec_decode.medusa.checkpoint import load_heads, load_shared_lm_head, save_heads
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads
from afterburner.spec_decode.tree import build_tree, tree_candidates
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63, chain

pytestmark = pytest.mark.sglang

NUM_HEADS = 3


@pytest.fixture(scope="module")
def loaded():
    """SGLang's own plugin loader has run afterburner's register in this process."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def heads_dir(tiny_model, tmp_path_factory):
    """Shared-lm_head heads for the tiny model, with random (not identity) residual blocks."""
    lm_head = load_file(str(tiny_model / "model.safetensors"))["lm_head.weight"]
    heads = MedusaHeads(HeadsConfig(hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0],
                                    num_heads=NUM_HEADS, shared_lm_head=True))
    torch.manual_seed(0)
    for param in heads.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return save_heads(heads, tmp_path_factory.mktemp("medusa") / "heads", lm_head_weight=lm_head)


# ---- registration and SGLang's argument resolution ----


def test_loader_registers_both_names_with_medusas_interface(loaded):
    for name in ("AFTERBURNER_MEDUSA", "afterburner_medusa", "MEDUSA"):
        assert_registered(name)


def test_registering_again_is_a_no_op_and_a_taken_alias_is_left_alone(loaded, monkeypatch):
    from sglang.srt.speculative import spec_registry

    def medusas():
        return [line for line in spec_algorithms.register_algorithms() if "MEDUSA" in line]

    both = ["speculative algorithm AFTERBURNER_MEDUSA", "speculative algorithm MEDUSA"]
    assert medusas() == both  # SGLang loads plugins more than once per process
    other_plugins = spec_registry.CustomSpecAlgo("MEDUSA", factory=lambda server_args: None)
    monkeypatch.setitem(spec_registry._REGISTRY, "MEDUSA", other_plugins)
    assert medusas() == both[:1]
    assert spec_registry.get_spec("MEDUSA") is other_plugins


@pytest.mark.parametrize("flags, tree, nodes, depth", [
    ([], "chain", NUM_HEADS + 1, NUM_HEADS),  # default: one node per head
    (["--speculative-num-draft-tokens", "8"], "paper", 8, 3),
])
def test_resolution_accepts_medusa_and_applies_its_defaults(loaded, heads_dir, tiny_model, monkeypatch,
                                                            flags, tree, nodes, depth):
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from afterburner.plugins.sglang.tree_spec_worker import TreeSpecWorker

    monkeypatch.setenv("AFTERBURNER_CONFIG", f'{{"speculative": {{"tree": "{tree}"}}}}')
    args, view = resolve(tiny_model, "--speculative-algorithm", "afterburner_medusa",
                          "--speculative-draft-model-path", str(heads_dir), *flags)
    assert view.speculative_algorithm == "AFTERBURNER_MEDUSA"
    assert (view.speculative_num_draft_tokens, view.speculative_num_steps, view.speculative_eagle_topk) == (
        nodes, depth, 1)
    assert view.disable_overlap_schedule and not view.enable_mixed_chunk
    assert view.cuda_graph_config.decode.backend == Backend.DISABLED
    algo = SpeculativeAlgorithm.from_string(view.speculative_algorithm)
    assert algo.create_worker(args) is TreeSpecWorker  # what the scheduler builds
    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    assert algo.create_future_map("cpu", pool).spec_algo is algo  # the scheduler builds one for any algorithm


HEADS = ["--speculative-draft-model-path", "{heads}"]
DRAFTS = "--speculative-num-draft-tokens"
CPU_LINE = (r"^--speculative-algorithm AFTERBURNER_MEDUSA on CPU needs --attention-backend torch_native \(or "
            r"intel_amx on an AMX CPU\): SGLang's tree verify has no path through triton$")


@pytest.mark.parametrize("flags, config, message", [
    ([], None, (r"^--speculative-algorithm AFTERBURNER_MEDUSA needs --speculative-draft-model-path: the "
                r"Medusa heads folder \(build one with `afterburner train medusa`\)$")),
    (["--speculative-draft-model-path", "{tiny}"], None,
     r"^--speculative-draft-model-path: .*tiny-llama/config\.json is not a Medusa checkpoint"),
    ([*HEADS, DRAFTS, "5"], '{"speculative": {"tree": "chain"}}',
     (r"^afterburner\.speculative\.tree: a chain drafts at most one token per depth: 4 > depth 3 \(on SGLang "
      r"--speculative-num-draft-tokens 5 = the root \+ 4 drafted nodes\)$")),
    ([*HEADS, DRAFTS, "3"], '{"speculative": {"tree": [[0], [0, 0, 0, 0]]}}',
     r"^afterburner\.speculative\.tree: the tree is 4 deep but the drafter reaches only depth 3"),
    ([*HEADS, DRAFTS, "1"], None, r"^--speculative-num-draft-tokens: 1 leaves no tree node to draft"),
    ([*HEADS, DRAFTS, "3"], '{"speculative": {"tree": "measured"}}',
     r'^afterburner\.speculative\.tree: "measured" needs Medusa heads .*; on vLLM only'),
    (HEADS, '{"speculative": {"acceptance": "typical"}}',
     r"^afterburner\.speculative\.acceptance: 'typical' is not available on SGLang"),
    (HEADS, '{"enabled": false}', r"^afterburner\.enabled: false, but --speculative-algorithm AFTERBURNER"),
    (HEADS, '{"speculative": {"draft_vocab": 64}}',
     r"^speculative\.draft_vocab: .* has no draft_vocab\.safetensors \(write one with `afterburner train draft-vocab"),
    ([*HEADS, "--attention-backend", "triton"], None, CPU_LINE),
])
def test_bad_settings_stop_resolution_with_one_line(loaded, heads_dir, tiny_model, monkeypatch, flags, config,
                                                    message):
    flags = [f.format(tiny=tiny_model, heads=heads_dir) for f in flags]
    assert_refused(monkeypatch, tiny_model, config, message, "--speculative-algorithm", "MEDUSA", *flags)


def test_intel_amx_on_a_cpu_without_amx_falls_back_to_torch_native_which_verifies(loaded, heads_dir, tiny_model,
                                                                                 monkeypatch):
    """SGLang itself swaps intel_amx for torch_native on a CPU without AMX (this one), before our check."""
    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    _, view = resolve(tiny_model, "--speculative-algorithm", "MEDUSA", "--speculative-draft-model-path",
                      str(heads_dir), backend="intel_amx")
    assert view.attention_backend == "torch_native" and view.speculative_algorithm == "MEDUSA"


@pytest.mark.parametrize("backend", ["afterburner-sparse", "afterburner-local-linear"])
def test_an_afterburner_attention_backend_with_medusa_is_refused_naming_the_pair(loaded, heads_dir, tiny_model,
                                                                                 monkeypatch, backend):
    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=f"^--attention-backend {backend} with --speculative-algorithm "
                                          "AFTERBURNER_MEDUSA is not supported yet"):
        resolve(tiny_model, "--speculative-algorithm", "MEDUSA", "--speculative-draft-model-path",
                 str(heads_dir), backend=backend)


def test_engine_refuses_medusa_on_a_cpu_backend_without_verify_before_any_subprocess(loaded, heads_dir, tiny_model,
                                                                                     monkeypatch):
    import sglang

    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    children = set(multiprocessing.active_children())
    with pytest.raises(ConfigError, match=CPU_LINE):
        sglang.Engine(model_path=str(tiny_model), speculative_algorithm="AFTERBURNER_MEDUSA",
                      speculative_draft_model_path=str(heads_dir), **{**ENGINE_KWARGS, "attention_backend": "triton"})
    assert set(multiprocessing.active_children()) == children


# ---- the draft stage in SGLang's data structures ----


SPARSE = [[0], [1], [2], [0, 0], [2, 0], [0, 1], [0, 0, 0], [2, 0, 0]]


@pytest.mark.parametrize("paths", [MC_SIM_7B_63, chain(4), SPARSE], ids=["paper", "chain", "sparse"])
def test_tree_links_are_what_sglang_derives_from_the_mask(paths):
    """SGLang's own host derivation of (retrieve_next_token, retrieve_next_sibling) from a tree mask (its
    NGRAM worker's, documented to match the device op) gives our links, and its positions rule
    (ancestors + committed length) our depths."""
    from sglang.srt.speculative.ngram_worker import _derive_tree_links

    tree = build_tree(paths, max_depth=4)
    links = tree_links(tree)
    bs, n = 2, tree.num_nodes
    next_token, next_sibling = _derive_tree_links(np.stack([tree.attn_mask.numpy()] * bs), bs, n)
    assert torch.equal(next_token, links.next_token.expand(bs, n))
    assert torch.equal(next_sibling, links.next_sibling.expand(bs, n))
    assert torch.equal(links.depth, tree.attn_mask.sum(-1) - 1)


def test_a_drafting_vocabulary_scores_its_tokens_only(heads_dir):
    """With ``speculative.draft_vocab`` the heads score the ranked tokens alone (the LM head's rows for them) and
    propose token ids of the whole vocabulary: the top-k among those tokens."""
    heads, lm_head = load_heads(heads_dir), load_shared_lm_head(heads_dir)
    tree = spec_checks.make_tree(heads.config.num_heads, 12, parse_config({"speculative": {"tree": "paper"}},
                                                                          source="test"))
    ids = torch.randperm(heads.config.vocab_size, generator=torch.Generator().manual_seed(3))[:40]
    hidden = torch.randn(3, heads.config.hidden_size, generator=torch.Generator().manual_seed(1))
    drafts = medusa.MedusaDrafter(heads, tree, lm_head, "cpu", ids).propose(hidden)
    with torch.no_grad():
        scores = heads(hidden, lm_head)[: tree.depth, :, ids]  # [D, B, 40]: the full logits at those ids
    expected = ids[scores.topk(tree.topk, dim=-1).indices.permute(1, 0, 2)]
    assert torch.equal(drafts.head_topk, expected)
    assert set(drafts.head_topk.flatten().tolist()) <= set(ids.tolist())
    whole = medusa.MedusaDrafter(heads, tree, lm_head, "cpu").propose(hidden).head_topk
    assert not torch.equal(drafts.head_topk, whole)


def test_draft_stage_puts_each_heads_top_k_where_the_tree_says(heads_dir):
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

    heads, lm_head = load_heads(heads_dir), load_shared_lm_head(heads_dir)
    tree = spec_checks.make_tree(heads.config.num_heads, 12, parse_config({"speculative": {"tree": "paper"}},
                                                                          source="test"))
    n = tree.num_nodes
    drafter, verifier = medusa.MedusaDrafter(heads, tree, lm_head, "cpu"), TreeVerifier(tree, "cpu")
    hidden = torch.randn(3, heads.config.hidden_size, generator=torch.Generator().manual_seed(1))

    drafts = drafter.propose(hidden)
    head_topk = drafts.head_topk  # [B, D, T]
    assert drafts.depths.tolist() == [tree.depth] * 3  # every request to the tree's depth
    with torch.no_grad():
        expected = heads(hidden, lm_head)[: tree.depth].topk(tree.topk, dim=-1).indices.permute(1, 0, 2)
    assert head_topk.shape == (3, tree.depth, tree.topk) and torch.equal(head_topk, expected)
    assert len({tuple(head_topk[b, 0].tolist()) for b in range(3)}) == 3  # the hidden state matters

    roots = torch.tensor([7, 8, 9], dtype=torch.int32)  # the last emitted tokens, as SGLang samples them
    tokens = verifier.tree_tokens(roots, head_topk)  # [B, N]
    for b in range(3):
        assert torch.equal(tokens[b], tree_candidates(tree, int(roots[b]), head_topk[b]))
        for i, path in enumerate(tree.choices, start=1):  # node (r_1..r_d): rank r_d of head d
            assert tokens[b, i] == head_topk[b, len(path) - 1, path[-1]]

    seq_lens = torch.tensor([5, 11, 2])
    verify = verifier.verify_input(tokens, seq_lens, seq_lens.tolist(), depths=drafts.depths, prefix_in_mask=False)
    assert isinstance(verify, NgramVerifyInput) and verify.is_verify_input()
    assert verify.draft_token_num == verify.num_tokens_per_req == verify.max_tree_depth == n
    assert torch.equal(verify.draft_token, tokens.flatten())
    depths = torch.tensor([0] + [len(p) for p in tree.choices])
    assert torch.equal(verify.positions.view(3, n), seq_lens[:, None] + depths)
    assert torch.equal(verify.retrieve_index, torch.arange(3 * n).view(3, n))
    assert torch.equal(verify.custom_mask.view(3, n, n), tree.attn_mask.expand(3, n, n))  # CPU: [B, N, N]
    links = tree_links(tree)
    assert torch.equal(verify.retrieve_next_token, links.next_token.expand(3, n))  # nothing cut
    assert torch.equal(verify.retrieve_next_sibling, links.next_sibling.expand(3, n))


def test_cuda_mask_layout_is_context_then_tree_per_request(heads_dir):
    """The layout SGLang's CUDA backends read (its NGRAM worker builds the same): [N, L_b + N] per request,
    numel = sum(L) * N + N^2 * B as ``NgramVerifyInput.generate_attn_arg_prefill`` sizes it."""
    heads = load_heads(heads_dir)
    tree = spec_checks.make_tree(heads.config.num_heads, 6, parse_config({"speculative": {"tree": "paper"}},
                                                                         source="test"))
    verifier = TreeVerifier(tree, "cpu")
    n, lengths = tree.num_nodes, [3, 0, 7]
    tokens = torch.zeros(len(lengths), n, dtype=torch.long)
    depths = torch.full((len(lengths),), tree.depth)
    mask = verifier.verify_input(tokens, torch.tensor(lengths), lengths, depths=depths, prefix_in_mask=True).custom_mask
    assert mask.numel() == sum(lengths) * n + n * n * len(lengths)
    start = 0
    for length in lengths:
        rows = mask[start:start + n * (length + n)].view(n, length + n)
        assert rows[:, :length].all() and torch.equal(rows[:, length:], tree.attn_mask)
        start += n * (length + n)


def test_carry_follows_the_scheduler_filtering_and_merging_its_batch():
    drafts = Drafts(torch.arange(12).view(3, 2, 2), torch.tensor([2, 1, 0]))
    first = TreeCarry(torch.tensor([1, 2, 3]), drafts, torch.tensor([10, 20, 30]))
    assert not first.is_draft_input() and not first.is_verify_input()  # no forward runs on it
    first.filter_batch(torch.tensor([2, 0]), [2, 0])
    assert first.roots.tolist() == [3, 1] and first.new_seq_lens.tolist() == [30, 10]
    assert torch.equal(first.drafts.head_topk, torch.arange(12).view(3, 2, 2)[[2, 0]])
    assert first.drafts.depths.tolist() == [0, 2]
    first.merge_batch(TreeCarry(torch.tensor([4]), Drafts(torch.full((1, 2, 2), 9), torch.tensor([1])),
                                torch.tensor([40])))
    assert first.roots.tolist() == [3, 1, 4] and first.new_seq_lens.tolist() == [30, 10, 40]
    assert first.drafts.head_topk.shape == (3, 2, 2) and (first.drafts.head_topk[2] == 9).all()
    assert first.drafts.depths.tolist() == [0, 2, 1]
