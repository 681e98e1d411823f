"""The Triton local-linear kernel on CPU under the Triton interpreter, against the float64 reference on
each sequence's contiguous keys (paged batches with shuffled blocks, decode and prefill chunks mixed, GQA,
Jacobi on and off, fp32 / fp16 / bf16 caches) and against softmax attention at a huge lambda. The kernel
computes in fp32 with FlashLLA's default stopping rule: 1e-3 against float64 (2e-4 measured at lambda
0.3). Small shapes: the interpreter runs about a second per (token, kv head) program here."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from afterburner.attention_backends.local_linear.reference import local_linear_reference
from support import REPO
from support.attention import make_batch, paged_sdpa, per_sequence

# As tests/unit/attention_backends/test_triton_kernels.py: TRITON_INTERPRET must be set before the process
# first imports triton; if it came in earlier without it, the file reruns itself in a fresh process.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETING = isinstance(triton.language.standard.max, InterpretedFunction)
in_this_process = pytest.mark.skipif(not INTERPRETING, reason="triton was imported without TRITON_INTERPRET "
                                     "in this process; test_lla_kernel_in_a_fresh_process runs these")

if INTERPRETING:  # imported here so that @triton.jit runs under the interpreter
    from afterburner.attention_backends.triton import local_linear, local_linear_direct


@pytest.mark.skipif(INTERPRETING, reason="this process interprets Triton: the tests run here")
def test_lla_kernel_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


reference_per_sequence = functools.partial(per_sequence, local_linear_reference)  # (batch, *, scale, lam)


@in_this_process
def test_kernel_runs_under_the_interpreter():
    assert isinstance(local_linear._local_linear_kernel, InterpretedFunction)


# (seq_lens, q_lens, cache block size, Hq, Hkv, lambda, jacobi, dtype): decode rows, a prefill chunk whose
# keys span several 16-key tiles, a sequence idle this step; lambda small enough that the CG matters.
CASES = [([9, 37, 4], [1, 2, 0], 4, 6, 2, 1.0, False, torch.float32),
         ([21, 5], [1, 2], 8, 2, 2, 0.3, True, torch.float32),
         ([18], [2], 16, 4, 1, 3.0, False, torch.float16),
         ([3, 19], [1, 1], 4, 4, 2, 10.0, True, torch.bfloat16)]


@in_this_process
@pytest.mark.parametrize("seq_lens, q_lens, cache_block, num_heads, num_kv_heads, lam, jacobi, dtype", CASES)
def test_kernel_matches_reference(seq_lens, q_lens, cache_block, num_heads, num_kv_heads, lam, jacobi, dtype):
    batch = make_batch(1, seq_lens=seq_lens, q_lens=q_lens, block_size=cache_block, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=16, dtype=dtype)
    out = local_linear.local_linear_paged_triton(*batch, scale=0.25, lam=lam, jacobi=jacobi, tile_n=16)
    assert out.dtype == dtype
    expected = reference_per_sequence(*batch, scale=0.25, lam=lam)  # on the same rounded inputs
    torch.testing.assert_close(out.double(), expected, atol=1e-3 + 2 * torch.finfo(dtype).eps, rtol=1e-3)


@in_this_process
def test_huge_lambda_is_softmax_attention_and_per_head_lambda():
    batch = make_batch(2, seq_lens=[20, 6], q_lens=[1, 1], block_size=4, num_heads=4, num_kv_heads=2, head_dim=16)
    out = local_linear.local_linear_paged_triton(*batch, scale=0.25, lam=1e9)
    torch.testing.assert_close(out, paged_sdpa(*batch, scale=0.25), atol=1e-5, rtol=1e-5)
    lams = torch.tensor([1e9, 0.5, 1e9, 2.0])
    mixed = local_linear.local_linear_paged_triton(*batch, scale=0.25, lam=lams)
    torch.testing.assert_close(mixed[:, 0::2], out[:, 0::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.double(), reference_per_sequence(*batch, scale=0.25, lam=lams.double()),
                               atol=1e-3, rtol=1e-3)


def test_token_positions_place_each_query_at_the_end_of_its_sequence():
    pytest.importorskip("triton")
    from afterburner.attention_backends.triton.local_linear import token_positions
    seq, pos = token_positions(torch.tensor([9, 5, 7]), torch.tensor([0, 1, 1, 4]), 4)
    assert seq.tolist() == [0, 2, 2, 2] and pos.tolist() == [8, 4, 5, 6]


@in_this_process
def test_launcher_rejects_what_the_kernel_cannot_read():
    batch = list(make_batch(0, seq_lens=[20], q_lens=[1], block_size=4, num_heads=4, num_kv_heads=2, head_dim=16))
    run = local_linear.local_linear_paged_triton
    with pytest.raises(ValueError, match="block_table"):
        run(*batch[:3], batch[3].long(), *batch[4:], scale=1.0, lam=1.0)
    with pytest.raises(ValueError, match="power of two"):
        run(batch[0][..., :8], batch[1][..., :8], batch[2][..., :8], *batch[3:], scale=1.0, lam=1.0)
    with pytest.raises(ValueError, match="multiple"):
        run(batch[0][:, :3], *batch[1:], scale=1.0, lam=1.0)


# The one-pass direct kernel: decode rows and a 2-query row, GQA, splits that leave some empty, dtypes.
DIRECT_CASES = [([9, 37, 4], [1, 2, 1], 4, 6, 2, 1.0, 1, torch.float32),
                ([45, 5], [1, 1], 8, 2, 2, 0.3, 3, torch.float32),
                ([40], [1], 16, 4, 1, 3.0, 4, torch.float16),
                ([3, 19], [1, 1], 4, 4, 2, 10.0, 2, torch.bfloat16)]


@in_this_process
@pytest.mark.parametrize("seq_lens, q_lens, cache_block, num_heads, num_kv_heads, lam, splits, dtype", DIRECT_CASES)
def test_direct_kernel_matches_reference(seq_lens, q_lens, cache_block, num_heads, num_kv_heads, lam, splits, dtype):
    batch = make_batch(2, seq_lens=seq_lens, q_lens=q_lens, block_size=cache_block, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=16, dtype=dtype)
    out = local_linear_direct.local_linear_direct_triton(*batch, scale=0.25, lam=lam, num_splits=splits, tile_n=16)
    assert out.dtype == dtype
    expected = reference_per_sequence(*batch, scale=0.25, lam=lam)
    torch.testing.assert_close(out.double(), expected, atol=1e-4 + 2 * torch.finfo(dtype).eps,
                               rtol=1e-4 + 2 * torch.finfo(dtype).eps)


@in_this_process
def test_direct_kernel_at_a_huge_lambda_is_softmax_attention():
    batch = make_batch(6, seq_lens=[20, 33], q_lens=[1, 1], block_size=4, num_heads=4, num_kv_heads=2, head_dim=16)
    out = local_linear_direct.local_linear_direct_triton(*batch, scale=0.25, lam=1e9, num_splits=2, tile_n=16)
    torch.testing.assert_close(out, paged_sdpa(*batch, scale=0.25), atol=1e-5, rtol=1e-5)
