"""Squeezed in blocks' choice in C (``squeezed/blocks_native``) against the torch rule it replaces: for each
(row, kv head), the ``budget`` best of the row's own context blocks by ``blocks.block_scores`` (best first, as
``topk`` orders them), named by ``context_heads``, then the columns of ``tail_heads``; rows of unequal sizes
(the torch path pads and masks them) and budgets; a budget past a row's blocks is refused."""

import ctypes

import pytest
import torch

from afterburner.attention_backends.squeezed import blocks, blocks_native

lib = blocks_native.library()
pytestmark = pytest.mark.skipif(not isinstance(lib, ctypes.CDLL), reason=f"no native library: {lib}")

HKV, G, D = 3, 3, 64


def _case(sizes, budgets, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, most = len(sizes), max(sizes)
    centroids = torch.randn(rows, HKV, most, D, generator=g)
    queries = torch.randn(rows, HKV * G, D, generator=g)
    context_heads = torch.randint(0, 10_000, (rows, HKV, most), generator=g, dtype=torch.int32)
    tail_heads = torch.randint(0, 10_000, (rows, HKV, width), generator=g, dtype=torch.int32)
    return (centroids, torch.tensor(sizes, dtype=torch.int32), queries, torch.tensor(budgets), context_heads,
            tail_heads)


def _reference(centroids, sizes, queries, budgets, context_heads, tail_heads):
    rows, width = centroids.shape[0], tail_heads.shape[2]
    out = torch.empty(rows, HKV, width, dtype=torch.int32)
    for r in range(rows):
        n, k = int(sizes[r]), int(budgets[r])
        scores = blocks.block_scores(centroids[r, :, :n], queries[r])  # [Hkv, n]
        chosen = scores.topk(k, dim=-1).indices
        out[r, :, :k] = context_heads[r].gather(1, chosen)
        out[r, :, k:] = tail_heads[r, :, k:]
    return out.flatten(0, 1)


@pytest.mark.parametrize("sizes, budgets, width", [
    ([250], [62], 64),  # one 8k-token context at 1/4, two tail blocks
    ([40, 250, 7], [10, 62, 7], 66),  # unequal contexts; a budget of all a row's blocks
    ([1, 300, 120], [1, 37, 15], 40),  # 1/8 and a one-block context
])
def test_the_c_choice_equals_the_torch_rule(sizes, budgets, width):
    case = _case(sizes, budgets, width)
    got = blocks_native.block_table(lib, *case)
    assert got.dtype == torch.int32 and got.shape == (len(sizes) * HKV, width)
    assert torch.equal(got, _reference(*case))


def test_many_rows_take_the_parallel_loop_with_the_same_result():
    sizes = [250 - 3 * i for i in range(16)]
    case = _case(sizes, [s // 4 for s in sizes], 70, seed=1)
    assert torch.equal(blocks_native.block_table(lib, *case), _reference(*case))


def test_a_budget_past_the_rows_blocks_or_the_width_is_refused():
    with pytest.raises(ValueError, match="budget exceeds"):
        blocks_native.block_table(lib, *_case([10], [11], 20))
    with pytest.raises(ValueError, match="budget exceeds"):
        blocks_native.block_table(lib, *_case([30], [25], 20))
