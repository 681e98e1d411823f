"""Helpers shared by the test tiers (importable as ``support``: pyproject's pytest ``pythonpath``).

Test modules import helpers from here and never from one another. Engine-free: nothing here imports
vllm or sglang (the attention oracle does not import afterburner either).

- ``support.attention``: a paged KV batch and the torch SDPA oracle for (paged) attention;
- ``support.stats``: the chi-square test for sampler distributions;
- ``support.medusa``: untrained Medusa heads and plain greedy decoding (the oracle) on a HF model;
- ``support.worker``: a worker script in a fresh process whose failure fails the test;
- ``REPO``: the repository root.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
