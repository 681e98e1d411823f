"""afterburner's sampled verification for SGLang on CPU (``plugins/sglang/sampled_verify.py``) writes
``eagle_sample``'s output format: at temperature 0 exactly what SGLang's own greedy tree walk writes (the CPU
op, checked against SGLang's Triton kernel in ``test_sglang_shim_ops.py``), on random trees and cut depths;
it never accepts a node past a request's cut; it names the sampling settings it does not reproduce.
Distribution-exactness through an engine: ``test_sglang_speculative_engine.py``."""

import random
from types import SimpleNamespace

import pytest
import torch
from sgl_kernel import cpu_spec_ops

from afterburner.plugins.sglang import sampled_verify
from afterburner.plugins.sglang.tree_verify import TreeVerifier
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import tree_paths

pytestmark = pytest.mark.sglang

VOCAB = 16  # above the largest rank in the trees below: siblings take their rank as token


def _case(rng: random.Random, nodes: int, bs: int = 4):
    """A paper tree of ``nodes`` drafted nodes, each node's token its rank (siblings distinct), random logits."""
    tree = build_tree(tree_paths("paper", max_depth=4, num_drafts=nodes), max_depth=4)
    verifier = TreeVerifier(tree, "cpu")
    tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(tree.num_nodes)] for _ in range(bs)])
    for b in range(bs):  # siblings get distinct tokens: the walk's first match is the only one
        for i, path in enumerate(tree.choices, start=1):
            tokens[b, i] = path[-1]
    logits = torch.randn(bs * tree.num_nodes, VOCAB)
    depths = [rng.randrange(0, tree.depth + 1) for _ in range(bs)]
    return tree, verifier, tokens, logits, depths


@pytest.mark.parametrize("nodes", [3, 7, 15])
def test_at_temperature_zero_it_writes_what_sglangs_greedy_walk_writes(nodes):
    rng = random.Random(nodes)
    walked = 0
    for _ in range(10):
        tree, verifier, tokens, logits, depths = _case(rng, nodes)
        bs, n = tokens.shape
        verify = verifier.verify_input(tokens, torch.zeros(bs, dtype=torch.long), [0] * bs,
                                       depths=torch.tensor(depths), prefix_in_mask=False)
        predict = torch.zeros(bs * n, dtype=torch.int32)
        accept_index = torch.full((bs, tree.depth + 1), -1, dtype=torch.int32)
        accepted = torch.zeros(bs, dtype=torch.int32)
        cpu_spec_ops.verify_tree_greedy_cpu(predict, accept_index, accepted, tokens, verify.retrieve_index,
                                            verify.retrieve_next_token, verify.retrieve_next_sibling,
                                            logits.argmax(-1).view(bs, n))
        ours = sampled_verify.sampled_accept(tree, tokens, logits, depths, [0.0] * bs, torch.Generator())
        assert torch.equal(ours[1], accepted + 1) and torch.equal(ours[2], accept_index)
        rows = accept_index[accept_index >= 0].long()
        assert torch.equal(ours[0][rows], predict[rows])  # elsewhere predict is scratch
        walked += int(accepted.sum())
    assert walked > 0  # drafts were accepted


def test_sampled_rows_never_accept_past_their_cut():
    rng = random.Random(1)
    tree, _, tokens, logits, depths = _case(rng, 15, bs=8)
    depths = [0, 1, 2, 3, 0, 1, 2, 3]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        _, lens, _ = sampled_verify.sampled_accept(tree, tokens, logits * 0, depths, [1.0] * 8, generator)
        assert all(length - 1 <= depth for length, depth in zip(lens.tolist(), depths, strict=True))


def test_unsupported_names_what_it_does_not_reproduce():
    from sglang.srt.sampling.sampling_params import TOP_K_ALL

    def req(**overrides):
        params = dict(top_k=TOP_K_ALL, top_p=1.0, min_p=0.0, sampling_seed=None) | overrides
        return SimpleNamespace(sampling_params=SimpleNamespace(**params))

    assert sampled_verify.unsupported(req()) is None
    assert sampled_verify.unsupported(req(top_p=0.9, sampling_seed=3)) == "top_p, sampling_seed"
    assert sampled_verify.unsupported(req(top_k=40, min_p=0.1)) == "top_k, min_p"
