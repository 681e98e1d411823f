"""The Triton local-linear kernel compiled for CUDA, at engine-like sizes, against the float64 reference:
SmolLM2's attention shape (9 query heads over 3 kv heads, head_dim 64) and a Llama-8B-like one (32 over 8,
head_dim 128), decode rows of up to 8k keys and a prefill chunk in shuffled 16-token blocks, fp32 and bf16
caches, lambda = 1 (the trained models learned 0.9-1.2), and a huge lambda against softmax attention; and the
direct solve on a padded decode batch (``local_linear/direct.py``) and as the one-pass Triton kernel
(``triton/local_linear_direct.py``). Lambda 0.3 with Jacobi was tried on an
H200: errors up to 0.12 on the 33-key sequence at head_dim 128, as the torch CG path gives on CPU (0.26):
FlashLLA's stopping rule, not the kernel (tests/unit/.../test_lla_direct.py keeps that case).

Tier 5 (gpu): skipped without CUDA; run in its own pytest process (see test_triton_kernels_gpu.py).
"""

import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.standard.max, InterpretedFunction):
    pytest.skip("this process runs Triton's interpreter; run tests/gpu in its own pytest process",
                allow_module_level=True)

from afterburner.attention_backends.local_linear.direct import local_linear_direct_batched  # noqa: E402
from afterburner.attention_backends.local_linear.reference import local_linear_reference  # noqa: E402
from afterburner.attention_backends.triton.local_linear import local_linear_paged_triton  # noqa: E402
from afterburner.attention_backends.triton.local_linear_direct import local_linear_direct_triton  # noqa: E402
from support.attention import gather, make_batch, paged_sdpa, per_sequence  # noqa: E402

pytestmark = pytest.mark.gpu
SEQ_LENS, Q_LENS = [8192, 1000, 33, 300], [1, 1, 1, 8]  # the last: a prefill chunk of 8 queries
reference = functools.partial(per_sequence, local_linear_reference)


def batch_on_gpu(seed, *, num_heads, num_kv_heads, head_dim, dtype):
    return make_batch(seed, seq_lens=SEQ_LENS, q_lens=Q_LENS, block_size=16, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("lam, jacobi", [(1.0, False), (1.0, True)])
def test_kernel_matches_float64_reference(num_heads, num_kv_heads, head_dim, dtype, lam, jacobi):
    batch = batch_on_gpu(0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = local_linear_paged_triton(*batch, scale=scale, lam=lam, jacobi=jacobi)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = reference(*batch, scale=scale, lam=lam)  # float64, on the same rounded inputs
    # fp32 kernel with FlashLLA's CG stopping rule: the torch CG path is off by up to 1.2e-3 on these shapes
    # (head_dim 128, CPU); bf16 adds output rounding.
    tol = 2e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_huge_lambda_is_softmax_attention():
    batch = batch_on_gpu(1, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.float32)
    out = local_linear_paged_triton(*batch, scale=128 ** -0.5, lam=1e9)
    torch.testing.assert_close(out, paged_sdpa(*batch, scale=128 ** -0.5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_direct_solve_on_a_padded_decode_batch(lam):
    query, k_cache, v_cache, table, seq_lens, _ = make_batch(
        2, seq_lens=SEQ_LENS, q_lens=[1] * len(SEQ_LENS), block_size=16, num_heads=32, num_kv_heads=8,
        head_dim=128, device="cuda")
    width = max(SEQ_LENS)
    keys = torch.stack([torch.nn.functional.pad(gather(k_cache, table[b], n), (0, 0, 0, 0, 0, width - n))
                        for b, n in enumerate(SEQ_LENS)])
    values = torch.stack([torch.nn.functional.pad(gather(v_cache, table[b], n), (0, 0, 0, 0, 0, width - n))
                          for b, n in enumerate(SEQ_LENS)])
    out = local_linear_direct_batched(query[:, None], keys, values, seq_lens, scale=128 ** -0.5, lam=lam)[:, 0]
    starts = torch.arange(len(SEQ_LENS) + 1, device="cuda")
    expected = reference(query, k_cache, v_cache, table, seq_lens, starts, scale=128 ** -0.5, lam=lam)
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_one_pass_direct_kernel_matches_float64_reference(num_heads, num_kv_heads, head_dim, dtype, lam):
    batch = batch_on_gpu(3, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = local_linear_direct_triton(*batch, scale=scale, lam=lam)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-3 if dtype == torch.float32 else 1e-2  # fp32 sums and solve; bf16 adds output rounding
    torch.testing.assert_close(out.double(), reference(*batch, scale=scale, lam=lam), atol=tol, rtol=tol)


def test_one_pass_decode_step_can_be_captured_in_a_cuda_graph():
    from afterburner.plugins.devtools.timing import cuda_graph

    batch = make_batch(4, seq_lens=[4000, 77], q_lens=[1, 1], block_size=16, num_heads=9, num_kv_heads=3,
                       head_dim=64, device="cuda")
    out = torch.empty_like(batch[0])
    replay = cuda_graph(lambda: out.copy_(local_linear_direct_triton(*batch, scale=0.125, lam=1.0)))
    out.zero_()
    replay()
    torch.testing.assert_close(out, local_linear_direct_triton(*batch, scale=0.125, lam=1.0))
    assert out.abs().sum() > 0
