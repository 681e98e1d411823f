"""The sgl_kernel test shim's torch versions of the CPU-build ops SGLang's speculative path calls
(``shim/sgl_kernel/cpu_spec_ops.py``) write what SGLang's own Triton kernels of the same names write (run by
Triton's interpreter in a process of their own, ``scripts/spec_ops_triton.py``), on random inputs: token trees
of several shapes with a small vocabulary (so walks accept through siblings), and ragged cache-location
segments. The KV row copy, whose Triton kernel takes raw addresses, is checked on its own terms."""

import json
import random

import pytest
import torch
from engine_setup import SCRIPTS
from sgl_kernel import cpu_spec_ops as ops

from afterburner.plugins.sglang.tree_verify import TreeVerifier
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import chain, tree_paths
from support.worker import run_worker_or_fail

pytestmark = pytest.mark.sglang

BS = 3


def _walk_inputs(rng: random.Random) -> list[dict]:
    inputs = []
    for paths in (chain(4), tree_paths("paper", max_depth=3, num_drafts=7), tree_paths("paper", max_depth=4,
                                                                                        num_drafts=15)):
        tree = build_tree(paths, max_depth=max(len(p) for p in paths))
        verify = TreeVerifier(tree, "cpu").verify_input(
            torch.zeros(BS, tree.num_nodes, dtype=torch.long), torch.zeros(BS, dtype=torch.long), [0] * BS,
            depths=torch.tensor([tree.depth, tree.depth, 1]), prefix_in_mask=False)
        for _ in range(4):
            tokens = [[rng.randrange(3) for _ in range(tree.num_nodes)] for _ in range(BS)]
            inputs.append({"op": "greedy_walk", "candidates": tokens, "retrieve_index": verify.retrieve_index.tolist(),
                           "retrieve_next_token": verify.retrieve_next_token.tolist(),
                           "retrieve_next_sibling": verify.retrieve_next_sibling.tolist(),
                           "target_predict": [[rng.randrange(3) for _ in row] for row in tokens],
                           "depth": tree.depth + 1})
    return inputs


def _segment_inputs(rng: random.Random) -> list[dict]:
    inputs = []
    for op in ("assign_extend_cache_locs", "assign_req_to_token_pool"):
        starts = [rng.randrange(0, 20) for _ in range(BS)]
        ends = [s + rng.randrange(0, 40) for s in starts]  # ragged, one segment may be empty
        slots = sum(ends) - sum(starts)
        inputs.append({"op": op, "req_pool_indices": rng.sample(range(6), BS), "start_offset": starts,
                       "end_offset": ends, "req_to_token": [[rng.randrange(1000) for _ in range(64)] for _ in range(6)],
                       "out_cache_loc": [rng.randrange(1000) for _ in range(slots)]})
    accept_index = [[rng.choice([rng.randrange(40), -1]) for _ in range(5)] for _ in range(BS)]
    inputs.append({"op": "fill_accept_out_cache_loc", "accept_index": accept_index,
                   "out_cache_loc": [rng.randrange(1000) for _ in range(40)]})
    return inputs


def _torch(given: dict) -> dict:
    t = {name: torch.tensor(value, dtype=torch.long) for name, value in given.items() if name not in ("op", "depth")}
    op = given["op"]
    if op == "greedy_walk":
        bs, n = t["candidates"].shape
        predicts = torch.zeros(bs * n, dtype=torch.int32)
        accept_index = torch.full((bs, given["depth"]), -1, dtype=torch.int32)
        accepted = torch.zeros(bs, dtype=torch.int32)
        ops.verify_tree_greedy_cpu(predicts, accept_index, accepted, t["candidates"], t["retrieve_index"],
                                   t["retrieve_next_token"], t["retrieve_next_sibling"], t["target_predict"])
        return {"predicts": predicts.tolist(), "accept_index": accept_index.tolist(), "accepted": accepted.tolist()}
    if op in ("assign_extend_cache_locs", "assign_req_to_token_pool"):
        req_to_token, out = t["req_to_token"].clone(), t["out_cache_loc"].clone()
        getattr(ops, f"{op}_cpu")(t["req_pool_indices"], req_to_token, t["start_offset"], t["end_offset"], out,
                                  req_to_token.shape[1])
        return {"req_to_token": req_to_token.tolist(), "out_cache_loc": out.tolist()}
    out = torch.zeros(t["accept_index"].numel(), dtype=torch.long)
    ops.fill_accept_out_cache_loc_cpu(t["accept_index"], t["out_cache_loc"], out)
    return {"accept_out_cache_loc": out.tolist()}


def test_the_shims_ops_write_what_sglangs_triton_kernels_write():
    rng = random.Random(0)
    inputs = _walk_inputs(rng) + _segment_inputs(rng)
    triton = run_worker_or_fail(SCRIPTS / "spec_ops_triton.py", json.dumps(
        [{k: v for k, v in given.items() if k != "depth"} for given in inputs]), timeout=600)[0]
    walks = [r for r, given in zip(triton, inputs, strict=True) if given["op"] == "greedy_walk"]
    assert sum(sum(r["accepted"]) for r in walks) > 0  # the walks do accept, through siblings too
    for given, expected in zip(inputs, triton, strict=True):
        got = _torch(given)
        if given["op"] == "greedy_walk":  # the Triton script's accept_index has N columns, the CPU op's D + 1
            expected["accept_index"] = [row[: given["depth"]] for row in expected["accept_index"]]
        assert got == expected, given["op"]


def test_the_kv_row_copy_reads_every_row_before_it_writes_one():
    """Rows moved within each buffer (float32 and bfloat16, different row sizes), with a target that is also
    another move's source: the result is a gather then a scatter."""
    buffers = [torch.randn(10, 2, 4), torch.randn(10, 3).bfloat16()]
    before = [b.clone() for b in buffers]
    tgt, src = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 7])
    ptrs = torch.tensor([b.data_ptr() for b in buffers])
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers])
    ops.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for buffer, old in zip(buffers, before, strict=True):
        expected = old.clone()
        expected[tgt] = old[src]
        assert torch.equal(buffer, expected)
