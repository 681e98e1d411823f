"""``--speculative-algorithm AFTERBURNER_HAMBURGER`` (the micro-step drafter) on the real sglang modules:
SGLang's plugin loader registers it (and the alias HAMBURGER) with the folder's
``model_type``; SGLang's argument resolution applies its defaults (a chain as long as the drafter reaches,
no CUDA graphs) and stops on bad settings with one line; the draft stage turns on SGLang's EAGLE-3 capture
of the drafter's feature layers on SGLang's own Llama class, reads the captured layers in the drafter's
order, drafts a chain per request whose length the stop head sets, and cuts each chain where it stopped:
SGLang's own greedy tree walk (its Triton kernel, interpreted) accepts nothing past the cut even where the
filler would match the target.

Engine runs (the capture inside a real target forward, verify steps, greedy output, acceptance equal to the
engine-free reference's): ``test_sglang_speculative_engine.py``."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from engine_setup import SCRIPTS
from safetensors.torch import load_file
from spec_args import assert_refused, assert_registered, resolve

from afterburner.plugins.config import parse_config
from afterburner.plugins.sglang import hamburger, spec_algorithms, spec_checks
from afterburner.plugins.sglang.tree_verify import TreeVerifier, cut_links, tree_links
from afterburner.spec_decode.hamburger.checkpoint import CheckpointError, read_config, save_drafter
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63
from support.hamburger import random_drafter, small_config
from support.worker import run_worker_or_fail

pytestmark = pytest.mark.sglang

STEPS = 4  # the drafter's max_micro_steps
TINY = dict(base_hidden_size=256, vocab_size=2048, feature_layers=(1,), hidden_size=64, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=32, intermediate_size=128, max_micro_steps=STEPS)


@pytest.fixture(scope="module")
def loaded():
    """SGLang's own plugin loader has run afterburner's register in this process."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    """A random drafter for the tiny model (2 layers: it reads layer 1's input), as ``save_drafter`` writes it."""
    return save_drafter(tmp_path_factory.mktemp("hamburger") / "drafter", random_drafter(small_config(**TINY)))


@pytest.fixture(scope="module")
def sglang_dir(drafter_dir, tmp_path_factory):
    """The folder with the ``model_type`` SGLang needs in config.json (it reads it with AutoConfig before any
    validator). Skips while ``spec_decode/hamburger/checkpoint.py`` refuses that field."""
    folder = shutil.copytree(drafter_dir, tmp_path_factory.mktemp("hamburger") / "for-sglang")
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_type", hamburger.FOLDER_CONFIG.model_type)
    (folder / "config.json").write_text(json.dumps(config))
    try:
        read_config(folder)
    except CheckpointError as exc:
        pytest.skip(f"drafter folders cannot carry model_type yet, so SGLang cannot read them: {exc}")
    return folder


# ---- registration and SGLang's argument resolution ----


def test_loader_registers_both_names_and_the_folder_model_type(loaded):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name in ("AFTERBURNER_HAMBURGER", "afterburner_hamburger", "HAMBURGER"):
        assert_registered(name)  # not SGLang's EAGLE-3, whose capture it borrows
    assert CONFIG_MAPPING["afterburner_hamburger"] is hamburger.FOLDER_CONFIG
    assert [r for r in spec_algorithms.register_algorithms() if "HAMBURGER" in r] == [
        "speculative algorithm AFTERBURNER_HAMBURGER", "speculative algorithm HAMBURGER"]


@pytest.mark.parametrize("flags, nodes", [([], STEPS + 1), (["--speculative-num-draft-tokens", "3"], 3)])
def test_resolution_applies_the_chain_and_no_cuda_graphs(loaded, sglang_dir, tiny_model, monkeypatch, flags, nodes):
    from sglang.srt.model_executor.cuda_graph_config import Backend

    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    _, view = resolve(tiny_model, "--speculative-algorithm", "afterburner_hamburger", "--speculative-draft-model-path",
                       str(sglang_dir), *flags)
    assert view.speculative_algorithm == "AFTERBURNER_HAMBURGER"
    assert (view.speculative_num_draft_tokens, view.speculative_num_steps, view.speculative_eagle_topk) == (
        nodes, nodes - 1, 1)
    assert view.disable_overlap_schedule and not view.enable_mixed_chunk
    assert view.cuda_graph_config.decode.backend == view.cuda_graph_config.prefill.backend == Backend.DISABLED


DRAFTER = ["--speculative-draft-model-path", "{drafter}"]


@pytest.mark.parametrize("flags, config, message", [
    ([], None, (r"^--speculative-algorithm AFTERBURNER_HAMBURGER needs --speculative-draft-model-path: the "
                r"micro-step drafter folder \(build one with `afterburner train hamburger`\)$")),
    (["--speculative-draft-model-path", "{tiny}"], None,
     r"^--speculative-draft-model-path: .*tiny-llama/config\.json is not a hamburger drafter config"),
    ([*DRAFTER, "--speculative-num-draft-tokens", "6"], None,
     (r"^--speculative-num-draft-tokens: 6 is the root \+ 5 drafted tokens, more than the drafter's "
      r"max_micro_steps 4; give at most 5$")),
    (DRAFTER, '{"speculative": {"tree": "paper"}}',
     r"^afterburner\.speculative\.tree: --speculative-algorithm AFTERBURNER_HAMBURGER drafts a chain; leave tree "
     r"unset or 'chain'$"),
    ([*DRAFTER, "--attention-backend", "triton"], None,
     r"^--speculative-algorithm AFTERBURNER_HAMBURGER on CPU needs --attention-backend torch_native "),
    (DRAFTER, '{"speculative": {"draft_vocab": 32}}',
     r"^speculative\.draft_vocab: .* has no draft_vocab\.safetensors \(write one with `afterburner train draft-vocab"),
])
def test_bad_settings_stop_resolution_with_one_line(loaded, request, tiny_model, monkeypatch, flags, config,
                                                    message):
    if DRAFTER[1] in flags:
        flags = [f.format(drafter=request.getfixturevalue("sglang_dir")) for f in flags]
    flags = [f.format(tiny=tiny_model) for f in flags]
    assert_refused(monkeypatch, tiny_model, config, message, "--speculative-algorithm", "HAMBURGER", *flags)


# ---- the draft stage ----


def _sglang_llama(tiny_model):
    """SGLang's own Llama class, with what its capture hook and ``load_drafter`` read (no weights loaded through
    SGLang: building its layers needs the parallel runtime); the embedding and LM head are the tiny model's."""
    from sglang.srt.models.llama import LlamaForCausalLM

    weights = load_file(str(tiny_model / "model.safetensors"))
    model = LlamaForCausalLM.__new__(LlamaForCausalLM)
    torch.nn.Module.__init__(model)
    model.pp_group = SimpleNamespace(is_last_rank=True)
    model.capture_aux_hidden_states = False
    model.model = SimpleNamespace(layers_to_capture=[],
                                  embed_tokens=SimpleNamespace(weight=weights["model.embed_tokens.weight"]))
    model.lm_head = SimpleNamespace(weight=weights["lm_head.weight"])
    return model, weights


def test_load_drafter_captures_the_drafters_layers_on_sglangs_llama(drafter_dir, tiny_model, monkeypatch):
    """SGLang captures the input of each layer in ``layers_to_capture`` (llama.py: the ith layer's aux state is
    the (i-1)th layer's output): there, the drafter's feature layers (HF indices: layer i's input)."""
    from sglang.srt import runtime_context

    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(tp_size=1))  # no runtime here
    model, weights = _sglang_llama(tiny_model)
    runner = SimpleNamespace(model=model, device="cpu",
                             model_config=SimpleNamespace(hidden_size=256, vocab_size=2048, num_hidden_layers=2))
    tree = spec_checks.make_tree(STEPS, None, parse_config({}, source="test"), shape="chain")
    args = SimpleNamespace(speculative_draft_model_path=str(drafter_dir))
    drafter = hamburger.load_drafter(args, runner, tree)
    assert model.capture_aux_hidden_states and model.model.layers_to_capture == list(TINY["feature_layers"])
    assert torch.equal(drafter.drafter.embed_weight, weights["model.embed_tokens.weight"])
    assert torch.equal(drafter.drafter.lm_head_weight, weights["lm_head.weight"])
    assert drafter.stop_threshold == small_config().stop_threshold  # the drafter's own

    runner.model_config.num_hidden_layers = 1  # layer 1's input is the final norm's, which SGLang cannot capture
    with pytest.raises(RuntimeError, match=r"^--speculative-draft-model-path: feature_layers \[1\] reach past"):
        hamburger.load_drafter(args, runner, tree)


def test_load_drafter_drafts_from_the_drafting_vocabulary(drafter_dir, tiny_model, monkeypatch, tmp_path):
    """``speculative.draft_vocab``: the drafter scores the folder's first N ranked tokens (its LM head's rows for
    them) and every draft is one of them; a folder without a ranking stops resolution with one line."""
    from sglang.srt import runtime_context

    from afterburner.spec_decode import draft_vocab

    folder = shutil.copytree(drafter_dir, tmp_path / "drafter")
    ranked = torch.randperm(2048, generator=torch.Generator().manual_seed(4))
    draft_vocab.save(folder, ranked)
    monkeypatch.setenv("AFTERBURNER_CONFIG", '{"speculative": {"draft_vocab": 32, "stop_threshold": 0}}')
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(tp_size=1))
    model, weights = _sglang_llama(tiny_model)
    runner = SimpleNamespace(model=model, device="cpu",
                             model_config=SimpleNamespace(hidden_size=256, vocab_size=2048, num_hidden_layers=2))
    tree = spec_checks.make_tree(STEPS, None, parse_config({}, source="test"), shape="chain")
    drafter = hamburger.load_drafter(SimpleNamespace(speculative_draft_model_path=str(folder)), runner, tree)
    assert torch.equal(drafter.drafter.vocab_ids, ranked[:32])
    assert torch.equal(drafter.drafter.lm_head_weight, weights["lm_head.weight"][ranked[:32]])
    hidden = torch.randn(6, 256, generator=torch.Generator().manual_seed(5))  # one feature layer
    drafts = drafter.propose(hidden, torch.arange(6))
    assert drafts.depths.tolist() == [STEPS] * 6
    assert set(drafts.head_topk.flatten().tolist()) <= set(ranked[:32].tolist())


def test_propose_reads_the_captured_layers_in_the_drafters_order():
    """SGLang packs captures in layer order; a drafter listing layer 3 before layer 1 reads them swapped."""
    config = small_config(feature_layers=(3, 1))
    inner = random_drafter(config)
    tree = build_tree([[0], [0, 0]], max_depth=2)
    drafter = hamburger.HamburgerDrafter(inner, tree, stop_threshold=0.0)
    layer1, layer3 = torch.randn(2, 5, config.base_hidden_size, generator=torch.Generator().manual_seed(2))
    roots = torch.tensor([1, 2, 3, 4, 5])
    drafts = drafter.propose(torch.cat([layer1, layer3], dim=-1), roots)  # [B, F * H] in layer order
    expected = inner.draft(torch.stack([layer3, layer1], dim=1), roots, max_tokens=2, stop_threshold=0.0)
    assert drafts.head_topk[:, :, 0].tolist() == expected and drafts.depths.tolist() == [2] * 5


def test_draft_stage_drafts_stop_head_lengths_and_cuts_each_chain():
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

    inner = random_drafter(small_config(**TINY), stop_std=0.3)  # P(continue) 0.5-1 here, not saturated
    tree = spec_checks.make_tree(STEPS, None, parse_config({}, source="test"), shape="chain")
    n, bs = tree.num_nodes, 8
    hidden = torch.randn(bs, 256, generator=torch.Generator().manual_seed(1))
    roots = torch.arange(10, 10 + bs)
    with torch.no_grad():
        _, p_continue = inner(hidden[:, None], roots[:, None])  # the stop head at the first micro-step: [B, 1]
    threshold = float(p_continue.median())  # some requests stop at once, some go on
    drafts = hamburger.HamburgerDrafter(inner, tree, stop_threshold=threshold).propose(hidden, roots)

    chains = inner.draft(hidden[:, None], roots, max_tokens=STEPS, stop_threshold=threshold)
    assert drafts.depths.tolist() == [len(chain) for chain in chains]
    assert 0 in drafts.depths.tolist() and max(drafts.depths.tolist()) > 0  # the stop head sets the length
    verifier = TreeVerifier(tree, "cpu")
    tokens = verifier.tree_tokens(roots, drafts.head_topk)  # [B, N]: root, then the chain
    seq_lens = torch.arange(3, 3 + bs)
    verify = verifier.verify_input(tokens, seq_lens, seq_lens.tolist(), depths=drafts.depths, prefix_in_mask=False)
    assert isinstance(verify, NgramVerifyInput) and verify.draft_token_num == n
    assert torch.equal(verify.positions.view(bs, n), seq_lens[:, None] + torch.arange(n))
    for b, chain in enumerate(chains):
        assert tokens[b, : 1 + len(chain)].tolist() == [int(roots[b]), *chain]
        assert (tokens[b, 1 + len(chain):] == hamburger.FILLER_TOKEN).all()
        links = [-1 if i >= len(chain) else i + 1 for i in range(n)]  # the chain ends at its last draft
        assert verify.retrieve_next_token[b].tolist() == links and (verify.retrieve_next_sibling[b] == -1).all()

    full = hamburger.HamburgerDrafter(inner, tree, stop_threshold=0.0).propose(hidden, roots)
    assert full.depths.tolist() == [STEPS] * bs  # threshold 0: every chain full length


def test_cut_links_leave_exactly_the_nodes_within_each_depth_reachable():
    """On the paper's tree: walking first-child / next-sibling links from the root reaches exactly the nodes
    no deeper than the request's depth."""
    tree = build_tree(MC_SIM_7B_63, max_depth=4)
    depths = torch.tensor([0, 1, 2, 3, 4])
    next_token, next_sibling = cut_links(tree_links(tree), depths)
    node_depth = tree.position_offsets
    for b, depth in enumerate(depths.tolist()):
        reached, frontier = set(), [0]
        while frontier:
            child = int(next_token[b, frontier.pop()])
            while child != -1:
                reached.add(child)
                frontier.append(child)
                child = int(next_sibling[b, child])
        assert reached == {i for i in range(1, tree.num_nodes) if node_depth[i] <= depth}


def test_sglangs_greedy_walk_accepts_nothing_past_the_cut():
    """The worst case: the filler past each cut is what the target predicts. Uncut, SGLang's walk accepts the
    whole chain; cut, each request accepts its drafts only (the walk, not the filler, decides)."""
    tree = build_tree([[0]] + [[0] * d for d in range(2, STEPS + 1)], max_depth=STEPS)
    n, bs = tree.num_nodes, 3
    verifier = TreeVerifier(tree, "cpu")
    tokens = torch.arange(100, 100 + bs * n).view(bs, n)
    target = torch.cat([tokens[:, 1:], torch.full((bs, 1), 7)], dim=1)  # the target agrees with every node
    inputs = []
    for depths in ([STEPS] * bs, [STEPS, 2, 0]):
        verify = verifier.verify_input(tokens, torch.zeros(bs, dtype=torch.long), [0] * bs,
                                       depths=torch.tensor(depths), prefix_in_mask=False)
        inputs.append({"candidates": tokens.tolist(), "retrieve_index": verify.retrieve_index.tolist(),
                       "retrieve_next_token": verify.retrieve_next_token.tolist(),
                       "retrieve_next_sibling": verify.retrieve_next_sibling.tolist(),
                       "target_predict": target.tolist()})
    uncut, cut = run_worker_or_fail(SCRIPTS / "spec_ops_triton.py", json.dumps(inputs), timeout=300)[0]
    assert uncut["accepted"] == [STEPS] * bs
    assert cut["accepted"] == [STEPS, 2, 0]
    assert cut["accept_index"][1][:4] == [n, n + 1, n + 2, -1]  # row 1: root, two drafts, then nothing
