"""EAGLE-3 (Li et al. 2025, arXiv 2503.01840) drafters in vLLM's layout, trained by afterburner's
self-distillation recipe: the baseline vLLM's own ``"method": "eagle3"`` runs. Engine-free."""
