"""Defaults and the ridge strength per query head, shared by the reference, the torch path and the kernel.

The defaults are FlashLLA's (``flashlla.lla_attention``, checked against its source): 32 CG iterations at
most, atol = rtol = 1e-12 on *squared* residuals (so about 1e-6 relative in the residual norm), no
preconditioner, delta_eps = 1e-12. FlashLLA's own default lambda (10.0) is not repeated here: lambda is a
model setting (per layer) and every caller passes it.
"""

from __future__ import annotations

import torch

CG_MAX_ITERS = 32
CG_ATOL = 1e-12
CG_RTOL = 1e-12
# delta_i = omega_i - mu_i.rho_i is the Schur complement of the weighted Gram matrix of (1, k_j - q_i):
# positive for lambda > 0, but it reaches 0 when lambda -> 0 and the keys fit the values exactly (at most D
# keys), where rounding leaves noise of either sign. Adding delta_eps * sign(delta) (sign(0) = +1) keeps
# the division finite without flipping the sign; weights are scaled so the largest is 1 (omega >= 1), so
# 1e-12 only matters in that degenerate case.
DELTA_EPS = 1e-12


def lambda_per_head(lam: float | torch.Tensor, num_heads: int, *, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """lambda as a [Hq] tensor: a float for every head, or one value per query head. Must be >= 0 and
    finite (lambda -> inf is softmax attention; use a large finite value for that): checked for a float,
    not for a tensor (that would be a device-to-host sync on every call)."""
    if not isinstance(lam, torch.Tensor) and not 0 <= lam < float("inf"):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if not isinstance(lam, torch.Tensor):  # filled on the device: no host copy (CUDA graphs can capture it)
        return torch.full((num_heads,), float(lam), dtype=dtype, device=device)
    lam = lam.to(dtype=dtype, device=device)
    if lam.dim() == 0:
        lam = lam.expand(num_heads)
    if lam.shape != (num_heads,):
        raise ValueError(f"lam must be a float or a tensor of one value per query head ({num_heads}), got "
                         f"shape {tuple(lam.shape)}")
    return lam


def away_from_zero(delta: torch.Tensor, delta_eps: float) -> torch.Tensor:
    """delta + delta_eps * sign(delta), sign(0) = +1 (``DELTA_EPS`` says why)."""
    return delta + delta_eps * torch.where(delta >= 0, 1.0, -1.0)
