"""The float64 reference against what Local Linear Attention must be, independently of how it is computed:
the intercept of a local linear fit reproduces values that are an affine function of the keys exactly
(lambda = 0), and as lambda -> inf it is softmax attention (torch SDPA, tests/support)."""

import pytest
import torch

from afterburner.attention_backends.local_linear.reference import local_linear_reference, ridge_terms
from support.attention import sdpa


def qkv(seed, num_q, num_k, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_q, num_heads, head_dim, generator=gen, dtype=torch.float64),
            torch.randn(num_k, num_kv_heads, head_dim, generator=gen, dtype=torch.float64),
            torch.randn(num_k, num_kv_heads, head_dim, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_affine_in_the_keys_are_reproduced_exactly(seed):
    """v_j = A k_j + c: a weighted linear fit through (k_j, v_j) is exact, so its intercept at q is A q + c
    (softmax attention gives a weighted mean of the v_j instead). Enough keys (> D + 1) for Sigma >= 0 to be
    invertible at lambda = 0, for every query."""
    q, k, _ = qkv(seed, 4, 20, 2, 2, 6)
    gen = torch.Generator().manual_seed(seed + 100)
    a, c = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    out = local_linear_reference(q, k, k @ a.T + c, scale=6 ** -0.5, lam=0.0, delta_eps=0.0)
    torch.testing.assert_close(out, q @ a.T + c, atol=1e-8, rtol=1e-8)
    softmax = sdpa(q, k, k @ a.T + c, scale=6 ** -0.5)
    assert (softmax - (q @ a.T + c)).abs().max() > 0.1  # the property is LLA's, not attention's


@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 2), (3, 1)])
def test_huge_lambda_is_softmax_attention(num_heads, num_kv_heads):
    q, k, v = qkv(3, 5, 17, num_heads, num_kv_heads, 8)
    out = local_linear_reference(q, k, v, scale=8 ** -0.5, lam=1e12)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=8 ** -0.5), atol=1e-9, rtol=1e-9)
    moderate = local_linear_reference(q, k, v, scale=8 ** -0.5, lam=1.0)
    assert (moderate - out).abs().max() > 1e-3  # lambda matters


def test_delta_is_positive_and_grows_to_omega_with_lambda():
    """delta = omega - mu.Sigma^-1 mu is a Schur complement: in (0, omega] for lambda > 0, -> omega."""
    q, k, _ = qkv(4, 6, 12, 2, 1, 8)
    for lam in (0.01, 1.0, 1e4):
        w, _, _, delta = ridge_terms(q, k, scale=8 ** -0.5, lam=lam)
        omega = w.sum(-1)
        assert (delta > 0).all() and (delta <= omega * (1 + 1e-12)).all()
    assert torch.allclose(delta, omega, rtol=1e-2)  # lambda = 1e4


def test_per_head_lambda_equals_each_head_alone():
    q, k, v = qkv(5, 3, 9, 4, 2, 8)
    lams = torch.tensor([0.1, 1.0, 10.0, 1e3], dtype=torch.float64)
    out = local_linear_reference(q, k, v, scale=0.3, lam=lams)
    for h in range(4):
        alone = local_linear_reference(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1],
                                       scale=0.3, lam=float(lams[h]))
        torch.testing.assert_close(out[:, h:h + 1], alone, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="one value per query head"):
        local_linear_reference(q, k, v, scale=0.3, lam=lams[:3])
    with pytest.raises(ValueError, match="finite"):
        local_linear_reference(q, k, v, scale=0.3, lam=float("inf"))
