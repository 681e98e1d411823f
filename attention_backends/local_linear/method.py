"""Local Linear Attention as an attention method of the registry: an *output method* (``selector.py``),
which computes the attention output itself over the paged cache instead of choosing what softmax reads.

The ridge strength lambda belongs to the model: a model trained with local-linear attention names it in
its ``config.json`` under ``MODEL_LAMBDA_KEY``, one float for every layer or a list of one per layer, and
that takes precedence over the config's ``attention.local_linear.lam``. Engine-free: the adapters hand
``make`` their model's config object (a transformers ``PretrainedConfig``: config.json keys it does not
know become attributes) and call the op per layer and step with the cache viewed as ``paged.py`` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afterburner.attention_backends.local_linear.model import LAMBDA_KEY as MODEL_LAMBDA_KEY  # what training writes
from afterburner.attention_backends.local_linear.paged import local_linear_paged


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def model_lambdas(model_config) -> float | tuple[float, ...] | None:
    """The model's own lambda (``MODEL_LAMBDA_KEY`` of its config; None when absent): one float, or a
    tuple of one per layer (``num_hidden_layers`` of them). ValueError, naming the key, for anything else."""
    value = getattr(model_config, MODEL_LAMBDA_KEY, None)
    if value is None:
        return None
    where = f"{MODEL_LAMBDA_KEY} in the model's config.json"
    if not isinstance(value, (list, tuple)):
        if not _positive(value):
            raise ValueError(f"{where} must be a finite float > 0 or a list of one per layer, got {value!r}")
        return float(value)
    num_layers = getattr(model_config, "num_hidden_layers", None)
    if not value or not all(map(_positive, value)) or (num_layers is not None and len(value) != num_layers):
        raise ValueError(f"{where} must list one finite float > 0 per layer ({num_layers} layers), "
                         f"got {value!r}"[:300])
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class LocalLinearOutput:
    """The local-linear output op of one engine process (``selector.AttentionOutput``).

    lam          ridge strength of every layer whose model names none (the config's)
    layer_lams   the model's own: one float for all layers, one per layer, or None
    cg_iters     conjugate-gradient iterations at most; jacobi: precondition them
    direct_max_queries  sequences with at most this many queries in a step solve directly (``direct.py``)
    """

    lam: float
    layer_lams: float | tuple[float, ...] | None
    cg_iters: int
    jacobi: bool
    direct_max_queries: int = 16

    def lam_of(self, layer: int) -> float:
        if self.layer_lams is None:
            return self.lam
        return self.layer_lams if isinstance(self.layer_lams, float) else self.layer_lams[layer]

    def __call__(self, layer: int, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                 scale: float) -> torch.Tensor:
        """o [T, Hq, D] for layer ``layer`` (shapes: ``paged.py``), by the torch paths (CPU engines)."""
        return local_linear_paged(query, k_cache, v_cache, block_table, seq_lens, query_start, scale=scale,
                                  lam=self.lam_of(layer), cg_max_iters=self.cg_iters, jacobi=self.jacobi,
                                  direct_max_queries=self.direct_max_queries)

    def triton(self, layer: int, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
               scale: float) -> torch.Tensor:
        """The same by the Triton kernels (GPU engines): a step of one query per sequence (decode, told by
        the shapes: no host sync) by the one-pass direct kernel unless ``direct_max_queries`` is 0, any
        other step by the CG kernel."""
        from afterburner.attention_backends.triton.local_linear import local_linear_paged_triton
        from afterburner.attention_backends.triton.local_linear_direct import local_linear_direct_triton

        lam = self.lam_of(layer)
        if query.shape[0] == block_table.shape[0] and self.direct_max_queries >= 1:
            return local_linear_direct_triton(query, k_cache, v_cache, block_table, seq_lens, query_start,
                                              scale=scale, lam=lam)
        return local_linear_paged_triton(query, k_cache, v_cache, block_table, seq_lens, query_start, scale=scale,
                                         lam=lam, cg_max_iters=self.cg_iters, jacobi=self.jacobi)


def make(settings, *, model_config=None) -> LocalLinearOutput:
    """From ``LocalLinearSettings`` (any object with ``lam``, ``cg_iters``, ``jacobi``, ``direct_max_queries``)
    and the model's config (or None)."""
    return LocalLinearOutput(float(settings.lam), model_lambdas(model_config), settings.cg_iters, settings.jacobi,
                             settings.direct_max_queries)
