"""Helpers for tests, benchmarks and the demo: where a results file came from (``provenance``), a
``vllm serve`` subprocess to talk to (``vllm_server``) and a worker process that reports one value
(``worker``). Engines never import it."""
