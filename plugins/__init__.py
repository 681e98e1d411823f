"""afterburner.plugins: the only package that talks to engines (vLLM, SGLang, lm-eval) and the CLI."""

__version__ = "0.1.0"
