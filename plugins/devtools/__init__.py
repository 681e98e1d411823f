"""Helpers for tests, benchmarks and the demo: where a results file came from (``provenance``) and a
``vllm serve`` subprocess to talk to (``vllm_server``). Engines never import it."""
