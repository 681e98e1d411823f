"""Engine-free attention methods: math, kernels and KV-selection policies (no vllm / sglang imports)."""
