"""Sequential Monte Carlo with AWRS on a vLLM engine: the Python API behind `afterburner smc`.

Each SMC step asks vLLM for the next-token distribution of every live particle: one request per particle,
prompt = the prompt's tokens + the particle's tokens, ``max_tokens=1`` and full-vocabulary log-probs.
With prefix caching on, a particle's prompt and earlier tokens are cached blocks, so a step (and a fork
after resampling, which is just two particles sharing a prefix) recomputes only the last partial block.
The engine must be created with ``max_logprobs=-1`` (full-vocabulary log-probs) and should have
``enable_prefix_caching=True``.

Cost note: vLLM returns full-vocabulary log-probs as Python dicts; on SmolLM2 (49k tokens) that costs
~0.3 s per particle per step on 2 CPU cores, more than the forward pass. Fine for tens of particles.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence

import torch

from afterburner.samplers.constraints import Constraint
from afterburner.samplers.request import constraint_for
from afterburner.samplers.smc import (
    Sample,
    SMCArgumentError,
    SMCResult,
    check_arguments,
    print_progress,
    smc,
    weighted_samples,
)


def _vllm_next_logits(llm: Any, prompt_ids: list[int], vocab_size: int) -> Callable:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=-1, detokenize=False)

    def next_logits(prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        prompts = [TokensPrompt(prompt_token_ids=[*prompt_ids, *prefix]) for prefix in prefixes]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        rows = torch.full((len(prefixes), vocab_size), -math.inf, dtype=torch.float64)
        for row, output in zip(rows, outputs, strict=False):
            logprobs = output.outputs[0].logprobs[0]
            row[list(logprobs)] = torch.tensor([lp.logprob for lp in logprobs.values()], dtype=torch.float64)
        return rows

    return next_logits


def judge_log_twist(llm: Any, template: str, answer: str) -> Callable[[Sequence[int]], float]:
    """A model-based reward for particle filtering: R(x) = log p(answer | template.format(text=x)) under
    the engine's own model (e.g. template "...{text}\nIs this answer correct?", answer " Yes"). One
    prompt-log-prob request per call; prefix caching makes the shared template cheap."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def log_twist(tokens: Sequence[int]) -> float:
        text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
        context = tokenizer.encode(template.format(text=text))
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=context + answer_ids)], params, use_tqdm=False)
        scored = output.prompt_logprobs[len(context):]
        return sum(position[token].logprob for position, token in zip(scored, answer_ids, strict=False))

    return log_twist


def constrained_smc(
    llm: Any,
    prompt: str,
    constraint: dict | Constraint,
    *,
    n_particles: int = 8,
    max_tokens: int = 64,
    ess_threshold: float = 0.5,
    seed: int = 0,
    log_twist: Callable[[Sequence[int]], float] | None = None,
    progress: bool = True,
) -> tuple[list[Sample], SMCResult]:
    """Samples of ``prompt``'s continuation under ``constraint`` (``{"regex": ...}``, ``{"json_schema": ...}``,
    ``{"lark": ...}``, or any ``Constraint`` object such as a ``TextPredicate``), properly weighted for the
    model restricted to the constraint (times exp(log_twist) when given: particle filtering with a reward,
    e.g. ``judge_log_twist``). Returns the samples, best first. Bad arguments are one ``SMCArgumentError``
    line (a constraint's: ``GrammarError``; both ``ValueError``) before the engine runs anything; a failing reward is a
    ``samplers.smc.RewardError``; the engine keeps serving after either."""
    check_arguments(n_particles=n_particles, max_tokens=max_tokens, ess_threshold=ess_threshold)
    tokenizer = llm.get_tokenizer()
    model_config = llm.llm_engine.model_config
    vocab_size = model_config.get_vocab_size()
    prompt_ids = tokenizer.encode(prompt)
    # each step asks for one token after prompt + particle: the particle may grow to max_model_len - prompt - 1
    room = model_config.max_model_len - len(prompt_ids) - 1
    if max_tokens > room:
        raise SMCArgumentError(f"SMC max_tokens {max_tokens} does not fit the engine: max_model_len "
                         f"{model_config.max_model_len} leaves {max(room, 0)} tokens after this prompt's "
                         f"{len(prompt_ids)}")
    if isinstance(constraint, dict):
        constraint = constraint_for(constraint, tokenizer, vocab_size)
    result = smc(
        _vllm_next_logits(llm, prompt_ids, vocab_size), constraint, n_particles=n_particles, max_tokens=max_tokens,
        eos_token_id=tokenizer.eos_token_id, ess_threshold=ess_threshold, log_twist=log_twist,
        generator=torch.Generator().manual_seed(seed), on_step=print_progress if progress else None,
    )
    if progress:
        print(file=sys.stderr)
    return weighted_samples(result, tokenizer.decode, tokenizer.eos_token_id), result
