"""Engine settings shared by the in-process fixture and the subprocess scripts (``scripts/``), so that
their greedy outputs are comparable token for token."""

PROMPTS = ["The module provides", "Return a new list of", "Open the file and"]
MAX_TOKENS = 12
ENGINE_KWARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    seed=0,
    distributed_executor_backend="uni",
    enable_prefix_caching=True,
    max_logprobs=-1,  # SMC asks for full-vocabulary log-probs
)
# A non-default value: seeing it inside the engine proves the config travelled there.
AFTERBURNER_SECTION = {"attention": {"sparse": {"budget_ratio": 0.125, "recent_pages": 3}}}
