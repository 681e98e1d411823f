"""The GPU ``CUSTOM`` backend on this CPU machine, as far as it can run without a GPU: vLLM resolves
``--attention-backend CUSTOM`` to afterburner's Triton-based backend and its configuration check accepts an
H100 setup; the Impl's block summaries match the cache; its decode (afterburner's Triton kernels under the
interpreter) reads the blocks torch Quest picks and matches the selective reference. vLLM's own Triton
kernels (stock cache write, dense attention) cannot run here: gpu_attention_check.py stands in a torch
cache write. Local-linear steps (gpu_local_linear_check.py) run afterburner's CG and one-pass kernels and
match the float64 reference. Engine start, CUDA graphs and speed need a GPU (tests/gpu, the GPU benchmarks)."""

import pytest
from result_script import run_result_script


@pytest.fixture(scope="module")
def result():
    return run_result_script("gpu_attention_check.py", env={"TRITON_INTERPRET": "1"})[0]


def test_custom_backend_resolves_and_its_sparse_decode_matches_the_reference(result):
    assert result["custom_class"] == "afterburner.plugins.vllm.gpu_attention.SelectiveTritonAttentionBackend"
    assert result["h100_rejections"] == []
    assert result["summaries_match"]
    assert result["stats"]["forward_calls"] == 1, "the sparse decode path must have run"
    # 4 of the 7 and 5 blocks per kv head (token budget 64 = 4 blocks of 16), as torch Quest picks
    assert result["stats"]["pages_read"] == sum(map(sum, result["expected_selected"])) == 16
    assert result["stats"]["pages_in_context"] == (7 + 5) * 2
    assert result["max_error"] < 1e-5


def test_custom_backend_keeps_decode_rows_sparse_beside_a_prefill_chunk(result):
    """A step with one decode row and another request's prefill chunk: the chunk gets the stock path
    (a torch stand-in here), the decode row the same sparse result it would get in a decode-only step."""
    assert result["mixed_decode_error"] < 1e-5 and result["mixed_prefill_error"] < 1e-5
    assert result["mixed_dense_differs"] > 1e-3, "the budget must make the decode row differ from dense"
    assert result["after_mixed"]["mixed_decode_rows"] == 1
    assert result["after_mixed"]["pages_read"] - result["stats"]["pages_read"] == 4 * 2, "decode row only"


@pytest.fixture(scope="module")
def local_linear():
    return run_result_script("gpu_local_linear_check.py", env={"TRITON_INTERPRET": "1"})[0]


def test_custom_backend_computes_local_linear_steps_with_its_kernels(local_linear):
    """A prefill chunk (CG kernel), a decode-only step (one-pass kernel) and a mixed step (CG kernel) all
    match the float64 reference; padded rows stay untouched."""
    assert local_linear["forward_calls"] == 3
    for step in ("prefill", "decode", "mixed"):
        assert local_linear[f"{step}_error"] < 1e-3, step


def test_an_output_method_without_a_gpu_path_is_refused(local_linear):
    assert "has no GPU path" in local_linear["refused"] and "'local_linear'" in local_linear["refused"]
