"""The Triton selective-attention kernels on CPU, under the Triton interpreter, against the torch specs:
Quest block scores vs ``quest.block_scores``, sparse paged decode vs ``selective_attention_reference``
(shuffled physical blocks, partial last blocks, several shapes, budgets, split counts, seeds and dtypes),
and the torch helpers that turn selections into the kernel's index lists. Small shapes: the interpreter is
slow."""

import math
import os
import subprocess
import sys

import pytest
import torch

from afterburner.attention_backends.selective import selective_attention_reference
from afterburner.attention_backends.sparse import quest
from afterburner.attention_backends.triton.selection import (
    indices_to_mask,
    mask_to_indices,
    topk_block_indices,
)
from support import REPO
from support.attention import make_batch

# Triton 3.9 reads TRITON_INTERPRET when @triton.jit decorates a function: its own tl.max, tl.sum, tl.cdiv
# at `import triton`, our kernels when their module runs (and the launch path asserts the two agree). So
# the variable must be set before the process first imports triton, and stay set (tests/gpu skips itself
# in a process that interprets).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# False when triton came in earlier without the variable: torch._dynamo imports it (through transformers
# in test_grammar, say), and `pytest tests` collects tests/gpu first. Then the in-process kernel tests skip
# and test_in_a_fresh_process reruns this file in a process of its own, so the kernels are still checked.
# Running with TRITON_INTERPRET=1 in the environment avoids that second process.
INTERPRETING = isinstance(triton.language.standard.max, InterpretedFunction)
in_this_process = pytest.mark.skipif(not INTERPRETING, reason="triton was imported without TRITON_INTERPRET "
                                     "in this process; test_in_a_fresh_process runs these")


@pytest.mark.skipif(INTERPRETING, reason="this process interprets Triton: the tests run here")
def test_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


if INTERPRETING:  # imported here so that their @triton.jit runs under the interpreter
    from afterburner.attention_backends.triton import quest_scores, sparse_decode


@in_this_process
def test_kernels_run_under_the_interpreter():
    for kernel in (quest_scores._quest_scores_kernel, sparse_decode._sparse_decode_kernel,
                   sparse_decode._merge_splits_kernel):
        assert isinstance(kernel, InterpretedFunction)


def _interpreter_dot_handles_bf16() -> bool:
    """Triton 3.9's interpreter holds bf16 as uint16 (numpy has no bfloat16) and its tl.dot multiplies
    those integers; bf16 decode is then checked on the GPU only (tests/gpu). Probed, so that a fixed
    interpreter gets used."""
    import triton.language as tl

    @triton.jit
    def _dot(a_ptr, o_ptr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        tl.store(o_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, a))

    a, out = torch.eye(16, dtype=torch.bfloat16), torch.zeros(16, 16)
    _dot[(1,)](a, out)
    return torch.equal(out, torch.eye(16))


BF16_DOT = INTERPRETING and _interpreter_dot_handles_bf16()
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_DOT, reason="the Triton interpreter's tl.dot mishandles bf16; tests/gpu covers it"))]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def decode_batch(seed, *, seq_lens, block_size, num_kv_heads, group, head_dim, dtype=torch.float32):
    query, k_cache, v_cache, table, seq_lens, starts = make_batch(
        seed, seq_lens=seq_lens, q_lens=[1] * len(seq_lens), block_size=block_size,
        num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    return query, k_cache, v_cache, table, seq_lens.int(), starts


def random_mask(seed, seq_lens, num_kv_heads, max_blocks, block_size, keep):
    """Each (sequence, kv head) keeps a random ``keep`` share of its blocks, always its last one."""
    gen = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(len(seq_lens), num_kv_heads, max_blocks, generator=gen) < keep
    mask[torch.arange(len(seq_lens)), :, ((seq_lens - 1) // block_size).long()] = True
    return mask


# (head_dim, group, block_size, kept share of blocks); kv heads 2, three sequences with partial last blocks.
DECODE_CASES = [
    (64, 1, 16, 0.5), (64, 3, 16, 1.0), (128, 4, 16, 0.25), (64, 4, 32, 0.5),
    (128, 3, 32, 1.0), (128, 1, 32, 0.25),
]


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("head_dim, group, block_size, keep", DECODE_CASES)
def test_sparse_decode_matches_reference(head_dim, group, block_size, keep, seed, dtype):
    seq_lens = [5 * block_size + 3, block_size, 2 * block_size - 1]
    query, k_cache, v_cache, table, lens, starts = decode_batch(
        seed, seq_lens=seq_lens, block_size=block_size, num_kv_heads=2, group=group, head_dim=head_dim,
        dtype=dtype)
    mask = random_mask(seed, lens, 2, table.shape[1], block_size, keep)
    scale = head_dim ** -0.5
    expected = selective_attention_reference(query, k_cache, v_cache, table, lens, starts, scale=scale,
                                             block_mask=mask).float()
    out = sparse_decode.sparse_paged_decode(query, k_cache, v_cache, table, lens,
                                            mask_to_indices(mask, lens, block_size), scale=scale,
                                            num_splits=1 + seed)  # one share, then two with a merge
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@in_this_process
@pytest.mark.parametrize("seed", [0, 1])
def test_every_block_selected_gives_dense_attention_for_any_split(seed):
    block_size = 16
    seq_lens = [13 * block_size + 5, 3, 40]  # 14 blocks: 4 tiles of 4
    query, k_cache, v_cache, table, lens, starts = decode_batch(
        seed, seq_lens=seq_lens, block_size=block_size, num_kv_heads=2, group=2, head_dim=64)
    dense = selective_attention_reference(query, k_cache, v_cache, table, lens, starts, scale=0.125)
    all_blocks = mask_to_indices(torch.ones(3, 2, table.shape[1], dtype=torch.bool), lens, block_size)
    # 8 asked: 4 shares (whole tiles each); the short rows leave shares empty, which must weigh nothing
    for num_splits in (1, 2, 8):
        out = sparse_decode.sparse_paged_decode(query, k_cache, v_cache, table, lens, all_blocks, scale=0.125,
                                                num_splits=num_splits)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@in_this_process
def test_padding_anywhere_unsorted_ids_and_rows_with_nothing_selected():
    block_size = 16
    query, k_cache, v_cache, table, lens, starts = decode_batch(
        3, seq_lens=[6 * block_size, 2 * block_size + 1], block_size=block_size, num_kv_heads=2, group=2,
        head_dim=64)
    ids = torch.tensor([[[4, -1, 0, 5, -1, 2], [-1] * 6],
                        [[2, -1, 1, -1, -1, -1], [0, -1, -1, -1, -1, 2]]], dtype=torch.int32)
    mask = indices_to_mask(ids, table.shape[1])
    expected = selective_attention_reference(query, k_cache, v_cache, table, lens, starts, scale=0.125,
                                             block_mask=mask)
    for num_splits in (1, 2):
        out = sparse_decode.sparse_paged_decode(query, k_cache, v_cache, table, lens, ids, scale=0.125,
                                                num_splits=num_splits)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out[0, 2:4].abs().max() == 0  # sequence 0, kv head 1 selected nothing: zeros, as the reference


@in_this_process
def test_launcher_rejects_what_the_kernel_cannot_read():
    query, k_cache, v_cache, table, lens, _ = decode_batch(0, seq_lens=[20], block_size=16, num_kv_heads=2,
                                                           group=2, head_dim=64)
    ids = torch.zeros(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_ids"):
        sparse_decode.sparse_paged_decode(query, k_cache, v_cache, table, lens, ids.long(), scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode.sparse_paged_decode(query.half(), k_cache, v_cache, table, lens, ids, scale=1.0)
    with pytest.raises(ValueError, match="power of two"):
        sparse_decode.sparse_paged_decode(query[..., :48], k_cache[..., :48], v_cache[..., :48], table, lens,
                                          ids, scale=1.0)


@in_this_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, group, block_size, seed",
                         [(64, 1, 16, 0), (128, 3, 32, 1), (64, 4, 16, 2)])
def test_quest_scores_match_reference(head_dim, group, block_size, seed, dtype):
    seq_lens = [9 * block_size + 2, block_size, 3]
    query, k_cache, _, table, lens, _ = decode_batch(
        seed, seq_lens=seq_lens, block_size=block_size, num_kv_heads=2, group=group, head_dim=head_dim,
        dtype=dtype)
    kmin, kmax = quest.summaries_from_cache(k_cache, torch.full((k_cache.shape[0],), block_size))
    scores = quest_scores.quest_block_scores(query, kmin, kmax, table, lens, block_size=block_size)
    assert scores.shape == (3, 2, table.shape[1]) and scores.dtype == torch.float32
    for b, seq_len in enumerate(lens.tolist()):
        n = math.ceil(seq_len / block_size)
        expected = quest.block_scores(query[b:b + 1], kmin, kmax, table[b, :n])
        torch.testing.assert_close(scores[b, :, :n], expected, atol=1e-4, rtol=1e-5)
        assert torch.isneginf(scores[b, :, n:]).all()


def test_mask_to_indices_round_trips_and_ignores_blocks_past_the_end():
    mask = torch.tensor([[[1, 0, 1, 1], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 1, 0, 1]]], dtype=torch.bool)
    lens = torch.tensor([64, 20])  # 4 and 2 blocks of 16: sequence 1 cannot read blocks 2, 3
    ids = mask_to_indices(mask, lens, 16)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[[0, 2, 3], [-1, -1, -1]], [[0, 1, -1], [1, -1, -1]]]
    readable = torch.tensor([[True] * 4, [True, True, False, False]])[:, None]  # [B, 1, MB]
    assert torch.equal(indices_to_mask(ids, 4), mask & readable)
    assert mask_to_indices(mask, lens, 16, width=5)[0, 0].tolist() == [0, 2, 3, -1, -1]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget, sinks, recents", [(5, 1, 2), (3, 2, 2), (12, 1, 1), (4, 0, 0)])
def test_topk_block_indices_selects_what_quest_selects(seed, budget, sinks, recents):
    gen = torch.Generator().manual_seed(seed)
    block_size, lens = 16, torch.tensor([160, 33, 16 * 12, 1])
    scores = torch.randn(len(lens), 3, 12, generator=gen)
    ids = topk_block_indices(scores, lens, block_size, budget=budget, sink_blocks=sinks,
                             recent_blocks=recents)
    got = indices_to_mask(ids, 12)
    for b, seq_len in enumerate(lens.tolist()):
        n = math.ceil(seq_len / block_size)
        expected = quest.select_blocks(scores[b, :, :n], budget=budget, sink_blocks=sinks,
                                       recent_blocks=recents)
        assert torch.equal(got[b, :, :n], expected) and not got[b, :, n:].any()
