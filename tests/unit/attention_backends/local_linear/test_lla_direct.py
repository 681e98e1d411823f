"""The direct solve (Sigma formed per query, Cholesky) against the float64 reference.

Tolerances: float64 in agrees to 1e-9 at every lambda down to 0.03 (it is the reference's math, factorised
rather than solved); float32 to 1e-3 for lambda >= 0.3 at head_dim 128 with few keys, where the CG path
with FlashLLA's stopping rule is off by 1e-3 without Jacobi and by 0.26 with it (measured, the case below)."""

import pytest
import torch

from afterburner.attention_backends.local_linear.blockwise import local_linear_blockwise
from afterburner.attention_backends.local_linear.direct import local_linear_direct, local_linear_direct_batched
from afterburner.attention_backends.local_linear.reference import local_linear_reference
from support.attention import sdpa


def qkv(seed, num_q, num_k, num_heads, num_kv_heads, head_dim, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(num_q, num_heads, head_dim), (num_k, num_kv_heads, head_dim), (num_k, num_kv_heads, head_dim)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


# (queries, keys, Hq, Hkv, D): decode, short chunks, prefill (T = L), GQA and MHA, fewer keys than D.
SHAPES = [(1, 23, 6, 2, 16), (5, 19, 4, 2, 8), (7, 7, 2, 2, 8), (1, 5, 4, 1, 16), (3, 40, 2, 1, 4)]


@pytest.mark.parametrize("lam", [0.03, 0.3, 1.0, 10.0, 1e6])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_q, num_k, num_heads, num_kv_heads, head_dim", SHAPES)
def test_float64_matches_reference(num_q, num_k, num_heads, num_kv_heads, head_dim, seed, lam):
    q, k, v = qkv(seed, num_q, num_k, num_heads, num_kv_heads, head_dim)
    scale = head_dim ** -0.5
    out = local_linear_direct(q, k, v, scale=scale, lam=lam)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, local_linear_reference(q, k, v, scale=scale, lam=lam), atol=1e-9, rtol=1e-9)


def test_float32_where_the_cg_stopping_rule_is_not_enough():
    q, k, v = qkv(3, 1, 33, 32, 8, 128, dtype=torch.float32)
    expected = local_linear_reference(q, k, v, scale=128 ** -0.5, lam=0.3)
    out = local_linear_direct(q, k, v, scale=128 ** -0.5, lam=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-3)
    jacobi = local_linear_blockwise(q, k, v, scale=128 ** -0.5, lam=0.3, jacobi=True)
    assert (jacobi.double() - expected).abs().max() > 10 * (out.double() - expected).abs().max()


def test_batch_pads_and_each_row_equals_its_own_sequence():
    """Sequences of different lengths in one padded call: keys past a length are ignored (filled with
    huge values here, so reading one shows), queries sit at each sequence's end, lambda per head."""
    lengths, num_q = [9, 30, 2], 2
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(3, 30, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 30, 2, 8, generator=gen, dtype=torch.float64)
    q = torch.randn(3, num_q, 4, 8, generator=gen, dtype=torch.float64)
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:] = 1e6, 1e6
    lam = torch.tensor([0.5, 1.0, 2.0, 1e6], dtype=torch.float64)
    out = local_linear_direct_batched(q, k, v, torch.tensor(lengths), scale=0.35, lam=lam)
    for b, n in enumerate(lengths):
        expected = local_linear_reference(q[b], k[b, :n], v[b, :n], scale=0.35, lam=lam)
        torch.testing.assert_close(out[b], expected, atol=1e-9, rtol=1e-9)


def test_huge_lambda_is_softmax_attention():
    q, k, v = qkv(2, 1, 50, 4, 2, 16)
    out = local_linear_direct(q, k, v, scale=0.25, lam=1e9)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.25), atol=1e-6, rtol=1e-6)


def test_shapes_that_do_not_fit_are_refused():
    q, k, v = qkv(0, 1, 8, 3, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        local_linear_direct(q, k, v, scale=1.0, lam=1.0)
