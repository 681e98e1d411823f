"""The Triton selective-attention kernels compiled for CUDA, at realistic sizes, against the torch specs:
a Llama-8B-like layer (32 query heads, 8 kv heads, head_dim 128, 16-token blocks) over four sequences up
to 32k tokens in shuffled physical blocks, Quest scores, top-k 1/8 selection and split-K decode.

Tier 5 (gpu): skipped without CUDA. Run it in its own process (`pytest tests/gpu`): once
tests/unit/attention_backends/test_triton_kernels.py has switched a process to the Triton interpreter, that
process cannot compile kernels, and these tests skip there.
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.standard.max, InterpretedFunction):
    pytest.skip("this process runs Triton's interpreter (tests/unit set TRITON_INTERPRET=1); run tests/gpu "
                "in its own pytest process", allow_module_level=True)

from afterburner.attention_backends.sparse import quest  # noqa: E402
from afterburner.attention_backends.triton.quest_scores import quest_block_scores  # noqa: E402
from afterburner.attention_backends.triton.selection import indices_to_mask, topk_block_indices  # noqa: E402
from afterburner.attention_backends.triton.sparse_decode import sparse_paged_decode  # noqa: E402
from support.attention import make_batch, paged_sdpa  # noqa: E402

pytestmark = pytest.mark.gpu
SEQ_LENS = [32768, 4099, 17, 12000]
BLOCK = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_rows_close(out, expected, tol):
    """||out - expected|| <= tol * ||expected|| for every [B, Hq] row: over thousands of random keys the
    outputs average towards 0, where an absolute tolerance would accept even a zero output."""
    out, expected = out.float().cpu(), expected.float().cpu()
    error = (out - expected).norm(dim=-1) / expected.norm(dim=-1)
    worst = divmod(int(error.argmax()), out.shape[1])
    assert error.max() <= tol, f"relative error {error.max():.3g} at (sequence, head) {worst}"


def make_cache(seed, *, num_heads, num_kv_heads, head_dim, dtype):
    """Paged cache on the GPU holding SEQ_LENS in shuffled physical blocks, plus one decode query each."""
    query, k_cache, v_cache, table, seq_lens, _ = make_batch(
        seed, seq_lens=SEQ_LENS, q_lens=[1] * len(SEQ_LENS), block_size=BLOCK, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, spare_blocks=5, dtype=dtype, device="cuda")
    return query, k_cache, v_cache, table, seq_lens.int()


def reference(query, k_cache, v_cache, table, seq_lens, *, scale, block_mask=None):
    """The SDPA oracle on CPU, in fp32 from the same values."""
    cpu = [x.cpu() for x in (query, k_cache, v_cache, table, seq_lens)]
    starts = torch.arange(len(SEQ_LENS) + 1)
    mask = None if block_mask is None else block_mask.cpu()
    return paged_sdpa(cpu[0].float(), cpu[1].float(), cpu[2].float(), cpu[3], cpu[4].long(), starts, scale=scale,
                      block_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 8, 128), (24, 8, 64), (8, 8, 128)])
def test_quest_selected_decode_matches_reference(num_heads, num_kv_heads, head_dim, dtype):
    query, k_cache, v_cache, table, seq_lens = make_cache(0, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                          head_dim=head_dim, dtype=dtype)
    kmin, kmax = quest.summaries_from_cache(k_cache.cpu(), torch.full((k_cache.shape[0],), BLOCK))
    scores = quest_block_scores(query, kmin.cuda(), kmax.cuda(), table, seq_lens, block_size=BLOCK)
    for b, n in enumerate(SEQ_LENS):
        n_blocks = math.ceil(n / BLOCK)
        expected = quest.block_scores(query[b:b + 1].cpu(), kmin, kmax, table[b, :n_blocks].cpu())
        torch.testing.assert_close(scores[b, :, :n_blocks].cpu(), expected, atol=1e-3, rtol=1e-4)
    budget = math.ceil(max(SEQ_LENS) / 8 / BLOCK)
    ids = topk_block_indices(scores, seq_lens, BLOCK, budget=budget, sink_blocks=1, recent_blocks=2)
    scale = head_dim ** -0.5
    expected = reference(query, k_cache, v_cache, table, seq_lens, scale=scale,
                         block_mask=indices_to_mask(ids, table.shape[1]))
    for num_splits in (None, 1, 7):
        out = sparse_paged_decode(query, k_cache, v_cache, table, seq_lens, ids, scale=scale,
                                  num_splits=num_splits)
        assert_rows_close(out, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("scale", [128 ** -0.5, 0.5])  # 0.5: a peaked softmax, where a wrong key shows
def test_every_block_selected_matches_dense_sdpa(scale):
    query, k_cache, v_cache, table, seq_lens = make_cache(1, num_heads=32, num_kv_heads=8, head_dim=128,
                                                          dtype=torch.bfloat16)
    width = table.shape[1]
    all_blocks = torch.arange(width, device="cuda", dtype=torch.int32).expand(len(SEQ_LENS), 8, width)
    out = sparse_paged_decode(query, k_cache, v_cache, table, seq_lens, all_blocks.contiguous(), scale=scale)
    starts = torch.arange(len(SEQ_LENS) + 1, device="cuda")
    dense = paged_sdpa(query.float(), k_cache.float(), v_cache.float(), table, seq_lens, starts, scale=scale)
    assert_rows_close(out, dense, TOLERANCE[torch.bfloat16])
