"""afterburner.plugins: the only package that talks to engines (vLLM, SGLang, lm-eval): their adapters
(vllm/, sglang/, lm_eval/) and what they share (config, compat, guard, report). Beside them, cli/ holds the
``afterburner`` command and devtools/ the helpers for tests, benchmarks and the demo."""

__version__ = "0.1.0"
