"""The GPU ``CUSTOM`` backend on this CPU machine, as far as it can run without a GPU: vLLM resolves
``--attention-backend CUSTOM`` to afterburner's Triton-based backend and its configuration check accepts an
H100 setup; the Impl's block summaries match the cache; its decode (afterburner's Triton kernels under the
interpreter) reads the blocks torch Quest picks and matches the selective reference. vLLM's own Triton
kernels (stock cache write, dense attention) cannot run here: gpu_attention_check.py stands in a torch
cache write. Engine start, CUDA graphs and speed need a GPU (tests/gpu, benchmarks/sparse_attention_gpu.py)."""

from result_script import run_result_script


def test_custom_backend_resolves_and_its_sparse_decode_matches_the_reference():
    result, _ = run_result_script("gpu_attention_check.py", env={"TRITON_INTERPRET": "1"})
    assert result["custom_class"] == "afterburner.plugins.vllm.gpu_attention.SelectiveTritonAttentionBackend"
    assert result["h100_rejections"] == []
    assert result["summaries_match"]
    assert result["stats"]["forward_calls"] == 1, "the sparse decode path must have run"
    # 4 of the 7 and 5 blocks per kv head (token budget 64 = 4 blocks of 16), as torch Quest picks
    assert result["stats"]["pages_read"] == sum(map(sum, result["expected_selected"])) == 16
    assert result["stats"]["pages_in_context"] == (7 + 5) * 2
    assert result["max_error"] < 1e-5
