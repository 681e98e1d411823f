"""Local Linear Attention over the paged cache (shuffled physical blocks, partial last blocks, prefill
chunks and decode tokens in one batch) against the reference on each sequence's contiguous keys; chunked
prefill through the cache equals one-shot prefill (chunks of up to 16 queries solved directly, the whole
prompt by CG). float64, CG to convergence: 1e-9. ``direct_max_queries`` 0 / 16: CG always / for sequences
of more than 16 queries only."""

import functools

import pytest
import torch

from afterburner.attention_backends.local_linear.paged import local_linear_paged
from afterburner.attention_backends.local_linear.reference import local_linear_reference
from support.attention import make_batch, per_sequence

CONVERGED = {"cg_atol": 0.0, "cg_rtol": 0.0}


reference_per_sequence = functools.partial(per_sequence, local_linear_reference)  # (batch, *, scale, lam)


# (seq_lens, q_lens, cache block size, Hq, Hkv, D): decode only, prefill only, mixed with an idle sequence.
BATCHES = [([9, 17, 4], [1, 1, 1], 4, 4, 2, 8), ([6, 13], [6, 13], 8, 2, 2, 16),
           ([21, 5, 11, 3], [3, 5, 0, 1], 4, 6, 2, 8), ([30], [7], 16, 4, 1, 16)]


@pytest.mark.parametrize("direct_max_queries", [0, 4, 16])
@pytest.mark.parametrize("lam", [0.2, 2.0, 1e5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("seq_lens, q_lens, cache_block, num_heads, num_kv_heads, head_dim", BATCHES)
def test_paged_equals_reference_on_contiguous_keys(seq_lens, q_lens, cache_block, num_heads, num_kv_heads,
                                                   head_dim, seed, lam, direct_max_queries):
    batch = make_batch(seed, seq_lens=seq_lens, q_lens=q_lens, block_size=cache_block, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.float64)
    scale = head_dim ** -0.5
    expected = reference_per_sequence(*batch, scale=scale, lam=lam)
    out = local_linear_paged(*batch, scale=scale, lam=lam, block_size=5, direct_max_queries=direct_max_queries,
                             **CONVERGED)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


def test_chunked_prefill_through_the_cache_equals_one_shot():
    """One sequence of 20 tokens: prefill at once, then as chunks 8 + 1 + 11 (the cache holding the
    tokens so far, seq_lens growing), then the decode step for token 20."""
    query, k_cache, v_cache, table, _, _ = make_batch(3, seq_lens=[21], q_lens=[21], block_size=4, num_heads=4,
                                                      num_kv_heads=2, head_dim=8, dtype=torch.float64)
    kwargs = dict(scale=0.35, lam=0.4, block_size=6, **CONVERGED)
    whole = local_linear_paged(query[:20], k_cache, v_cache, table, torch.tensor([20]), torch.tensor([0, 20]),
                               **kwargs)
    chunks = [local_linear_paged(query[s:e], k_cache, v_cache, table, torch.tensor([e]), torch.tensor([0, e - s]),
                                 **kwargs) for s, e in ((0, 8), (8, 9), (9, 20))]
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-10, rtol=1e-10)
    decode = local_linear_paged(query[20:21], k_cache, v_cache, table, torch.tensor([21]), torch.tensor([0, 1]),
                                **kwargs)
    full = local_linear_paged(query, k_cache, v_cache, table, torch.tensor([21]), torch.tensor([0, 21]), **kwargs)
    torch.testing.assert_close(decode, full[20:21], atol=1e-10, rtol=1e-10)


def test_float32_cache_keeps_its_dtype():
    batch = make_batch(4, seq_lens=[12, 7], q_lens=[2, 1], block_size=4, num_heads=2, num_kv_heads=1, head_dim=8)
    out = local_linear_paged(*batch, scale=0.35, lam=1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_per_sequence(*batch, scale=0.35, lam=1.0),
                               atol=2e-3, rtol=2e-3)


def test_few_queries_solve_directly_and_many_by_cg(monkeypatch):
    from afterburner.attention_backends.local_linear import paged

    calls = []
    for name in ("local_linear_direct", "local_linear_blockwise"):
        real = getattr(paged, name)
        monkeypatch.setattr(paged, name, lambda q, *a, _real=real, _name=name, **kw: (calls.append((_name, len(q))),
                                                                                     _real(q, *a, **kw))[1])
    batch = make_batch(5, seq_lens=[30, 9, 40], q_lens=[1, 9, 17], block_size=4, num_heads=4, num_kv_heads=2,
                       head_dim=8, dtype=torch.float64)
    local_linear_paged(*batch, scale=0.35, lam=1.0)
    assert calls == [("local_linear_direct", 1), ("local_linear_direct", 9), ("local_linear_blockwise", 17)]
