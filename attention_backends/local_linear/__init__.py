"""Local Linear Attention (Zuo et al. 2025, arXiv 2510.01450; FlashLLA): the output is the intercept of a
kernel-weighted local linear regression of values on keys centred at the query, instead of softmax
attention's weighted mean. Engine-free; uses the ordinary KV cache (no extra state).

params.py (defaults, taken from FlashLLA, and lambda per head) -> reference.py (float64, linalg.solve: the
spec) -> blockwise.py (online softmax statistics, matrix-free conjugate gradient, one apply pass) ->
paged.py (prefill and decode over the paged KV cache). The Triton forward is
``attention_backends/triton/local_linear.py``.
"""
