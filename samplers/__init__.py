"""Engine-free constrained and adaptive samplers: constraints, AWRS, SMC (no vllm / sglang imports)."""
