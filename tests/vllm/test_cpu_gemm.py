"""Proposers' matmuls through vLLM's own CPU GEMM (``plugins/vllm/cpu_gemm``) give torch's results."""

import pytest
import torch
from torch import nn

pytest.importorskip("vllm._custom_ops")

from afterburner.plugins.vllm import cpu_gemm  # noqa: E402


@pytest.mark.parametrize("shape", [(5,), (1, 5), (3, 5), (2, 4, 5)])
def test_linear_equals_torch_for_any_leading_shape(shape):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 5, generator=g), torch.randn(300, generator=g)
    x = torch.randn(*shape, generator=g)
    torch.testing.assert_close(cpu_gemm.linear(weight)(x), nn.functional.linear(x, weight), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu_gemm.linear(weight, bias)(x), nn.functional.linear(x, weight, bias), rtol=1e-4,
                               atol=1e-4)


def test_accelerated_modules_compute_what_they_did():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4, bias=False)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = module(x)
        assert cpu_gemm.accelerate_linears(module) == 2
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    module[0].forward = nn.Linear(8, 16).forward  # the check above can fail: another weight changes the output
    with torch.no_grad():
        assert not torch.allclose(module(x), expected)


def test_skipped_linears_keep_their_own_forward():
    module = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).eval()
    assert cpu_gemm.accelerate_linears(module, skip=(module[0],)) == 1
    assert "forward" not in vars(module[0]) and "forward" in vars(module[1])
