"""Engine-free speculative decoding: heads, trees and acceptance rules (no vllm / sglang imports)."""
