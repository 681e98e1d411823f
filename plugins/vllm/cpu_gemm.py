"""Proposers' matmuls through vLLM's own CPU GEMM (oneDNN with a prepacked weight, as vLLM runs the model).

torch's CPU matmul reads a [V, H] weight for a few rows at a fraction of the memory bandwidth: on the
development machine a drafter's projection onto SmolLM2's 49,152-token LM head took 12 ms for one row and
45 ms for three (vLLM's own LM head call: 5 ms), so drafting cost more than the steps it saved. vLLM prepares
each linear layer of a model once (``dispatch_cpu_unquantized_gemm``); the same is done here for a
proposer's weights. Inference only (no autograd); any leading shape, rows flattened for the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., H] -> x @ weight.T (+ bias) [..., N], through vLLM's CPU GEMM for CPU float weights (else torch)."""
    weight = weight.detach().contiguous()
    if weight.device.type != "cpu":
        return lambda x: nn.functional.linear(x, weight, bias)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = nn.Module()
    holder.weight = nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    bias = None if bias is None else bias.detach().float()
    call = holder.cpu_linear

    def apply(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype).contiguous()
        return call(rows, holder.weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    return apply


def accelerate_linears(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Route every ``nn.Linear`` of ``module`` but those in ``skip`` through ``linear`` (inference only; each
    prepacks a copy of its weight); returns how many."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not any(layer is other for other in skip):
            layer.forward = linear(layer.weight, layer.bias)
            count += 1
    return count
