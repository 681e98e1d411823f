"""The blockwise torch path (online statistics, matrix-free CG, apply pass) against the float64 reference.

Tolerances: float64 with CG run to convergence (atol = rtol = 0; D <= 16 so 32 iterations reach the solve)
agree to 1e-9 relative; FlashLLA's default stopping rule (about 1e-6 in the relative residual norm) to
1e-4 for lambda >= 1, where delta is not small; float32 inputs to 2e-3 for lambda >= 1."""

import pytest
import torch

from afterburner.attention_backends.local_linear import blockwise
from afterburner.attention_backends.local_linear.blockwise import local_linear_blockwise
from afterburner.attention_backends.local_linear.reference import local_linear_reference, ridge_terms
from support.attention import sdpa

CONVERGED = {"cg_atol": 0.0, "cg_rtol": 0.0}


def qkv(seed, num_q, num_k, num_heads, num_kv_heads, head_dim, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(num_q, num_heads, head_dim), (num_k, num_kv_heads, head_dim), (num_k, num_kv_heads, head_dim)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


# (queries, keys, Hq, Hkv, D, key block): prefill (T = L), chunks (T < L), decode (T = 1), GQA and MHA,
# blocks that do and do not divide L, a block larger than L.
SHAPES = [(7, 7, 2, 2, 8, 4), (5, 19, 4, 2, 8, 4), (1, 23, 6, 2, 16, 8), (12, 12, 3, 1, 16, 5),
          (3, 40, 2, 1, 4, 64), (9, 33, 4, 4, 16, 16)]
LAMBDAS = [0.03, 0.3, 1.0, 10.0, 1e6]


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_q, num_k, num_heads, num_kv_heads, head_dim, block", SHAPES)
@pytest.mark.parametrize("jacobi", [False, True])
def test_converged_blockwise_matches_reference(num_q, num_k, num_heads, num_kv_heads, head_dim, block, seed,
                                               lam, jacobi):
    q, k, v = qkv(seed, num_q, num_k, num_heads, num_kv_heads, head_dim)
    scale = head_dim ** -0.5
    expected = local_linear_reference(q, k, v, scale=scale, lam=lam)
    out = local_linear_blockwise(q, k, v, scale=scale, lam=lam, block_size=block, jacobi=jacobi, **CONVERGED)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("lam", [1.0, 10.0, 1e6])
@pytest.mark.parametrize("num_q, num_k, num_heads, num_kv_heads, head_dim, block", SHAPES)
def test_default_stopping_rule_and_float32(num_q, num_k, num_heads, num_kv_heads, head_dim, block, lam):
    q, k, v = qkv(7, num_q, num_k, num_heads, num_kv_heads, head_dim)
    expected = local_linear_reference(q, k, v, scale=head_dim ** -0.5, lam=lam)
    out = local_linear_blockwise(q, k, v, scale=head_dim ** -0.5, lam=lam, block_size=block)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out32 = local_linear_blockwise(q.float(), k.float(), v.float(), scale=head_dim ** -0.5, lam=lam,
                                   block_size=block)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, atol=2e-3, rtol=2e-3)


def solve_rows(q, k, lam, *, block, **cg):
    """rho from the blockwise statistics and CG, and the reference's linalg.solve, both [Hq, T, D]."""
    rows, keys, _, lam_rows = blockwise._grouped(q, k, k, lam)
    stats = blockwise.softmax_statistics(rows, keys, scale=0.35, block_size=block, jacobi=True)
    rho = blockwise.conjugate_gradient(
        lambda x: blockwise.sigma_times(x, rows, keys, stats, lam_rows, scale=0.35, block_size=block),
        blockwise.centred_mean(rows, stats), **cg)
    return rho.flatten(0, 1), ridge_terms(q, k, scale=0.35, lam=lam)[2]


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_cg_converges_to_the_solve(lam):
    q, k, _ = qkv(11, 6, 30, 4, 2, 16)
    errors = []
    for iters in (2, 6, 32):
        rho, solved = solve_rows(q, k, lam, block=8, max_iters=iters, atol=0.0, rtol=0.0)
        errors.append((rho - solved).abs().max().item() / solved.abs().max().item())
    assert errors[0] > 1e-3 and errors[0] > errors[1] > errors[2]  # few iterations are visibly short
    assert errors[2] < 1e-10


def test_jacobi_preconditioner_uses_the_exact_diagonal_and_converges():
    q, k, _ = qkv(12, 6, 30, 4, 2, 16)
    k = k * torch.linspace(0.2, 3.0, 16, dtype=torch.float64)  # keys of unequal spread: a diagonal to fix
    rows, keys, _, lam_rows = blockwise._grouped(q, k, k, 0.5)
    stats = blockwise.softmax_statistics(rows, keys, scale=0.35, block_size=8, jacobi=True)
    diagonal = blockwise.sigma_diagonal(rows, stats, lam_rows)
    eye = torch.eye(16, dtype=torch.float64)
    columns = torch.stack([blockwise.sigma_times(eye[i].expand_as(rows), rows, keys, stats, lam_rows, scale=0.35,
                                                 block_size=8)[..., i] for i in range(16)], -1)
    torch.testing.assert_close(diagonal, columns, atol=1e-10, rtol=1e-10)
    rho, solved = solve_rows(q, k, 0.5, block=8, diagonal=diagonal, max_iters=32, atol=0.0, rtol=0.0)
    torch.testing.assert_close(rho, solved, atol=1e-9, rtol=1e-9)


def test_huge_lambda_is_softmax_attention():
    q, k, v = qkv(13, 5, 21, 4, 2, 16, dtype=torch.float32)
    out = local_linear_blockwise(q, k, v, scale=0.25, lam=1e9, block_size=8)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_is_the_last_row_of_prefill_and_chunks_equal_one_shot(seed):
    q, k, v = qkv(seed, 24, 24, 4, 2, 8)
    kwargs = dict(scale=8 ** -0.5, lam=0.5, block_size=5, **CONVERGED)
    whole = local_linear_blockwise(q, k, v, **kwargs)
    for n in (1, 9, 24):  # decode at position n - 1, with the first n keys in the cache
        torch.testing.assert_close(local_linear_blockwise(q[n - 1:n], k[:n], v[:n], **kwargs), whole[n - 1:n],
                                   atol=1e-10, rtol=1e-10)
    chunks = [local_linear_blockwise(q[s:e], k[:e], v[:e], **kwargs) for s, e in ((0, 7), (7, 8), (8, 24))]
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-10, rtol=1e-10)


def test_grouped_query_heads_equal_repeated_kv_heads():
    q, k, v = qkv(14, 6, 15, 6, 2, 8)
    grouped = local_linear_blockwise(q, k, v, scale=0.3, lam=0.7, block_size=4, **CONVERGED)
    repeated = local_linear_blockwise(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=0.3,
                                      lam=0.7, block_size=4, **CONVERGED)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


def test_per_head_lambda_and_delta_eps_reach_the_output():
    q, k, v = qkv(15, 4, 10, 4, 2, 8)
    lams = torch.tensor([0.05, 0.5, 5.0, 5e5], dtype=torch.float64)
    for delta_eps in (1e-12, 0.5):
        expected = local_linear_reference(q, k, v, scale=0.3, lam=lams, delta_eps=delta_eps)
        out = local_linear_blockwise(q, k, v, scale=0.3, lam=lams, delta_eps=delta_eps, block_size=3, **CONVERGED)
        torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    assert (out - local_linear_reference(q, k, v, scale=0.3, lam=lams)).abs().max() > 1e-3


def test_rejects_shapes_that_do_not_fit():
    q, k, v = qkv(16, 4, 10, 3, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        local_linear_blockwise(q, k, v, scale=0.3, lam=1.0)
    q, k, v = qkv(16, 4, 3, 2, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):  # more queries than keys
        local_linear_blockwise(q, k, v, scale=0.3, lam=1.0)
