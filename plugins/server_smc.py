"""SMC over a running OpenAI-compatible server: particle filtering as a client of ``vllm serve`` with any
afterburner method on (speculative decoding, sparse attention, ...), which then speeds up every particle.

The algorithm is ``samplers/smc_chunks.py`` (the proposal is the model's own sampler, a chunk of tokens per
step; weights come from the constraint and the reward only). Each SMC step sends one ``/v1/completions``
request per live particle, all at once so the server batches them: prompt = the prompt's token ids + the
particle's tokens, ``max_tokens`` = the chunk, ``return_token_ids`` for the exact tokens, and a seed per
particle and step. Every sampling parameter is set explicitly to the model's own distribution (temperature
1, top_p 1, top_k off, min_p 0, no penalties): the weights assume the proposal is the model, and vLLM would
otherwise apply the model's ``generation_config`` defaults. A completion that stops on one of the server's
end tokens ends the particle (its last token counts as EOS). With prefix caching (vLLM's default) each
request recomputes only the particle's newest tokens.
"""

from __future__ import annotations

import itertools
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from afterburner.samplers.constraints import Constraint
from afterburner.samplers.request import constraint_for
from afterburner.samplers.smc import Sample, SMCResult, check_arguments, print_progress, weighted_samples
from afterburner.samplers.smc_chunks import Extend, chunked_smc

# the model's own distribution, whatever the server's defaults
MODEL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0}
MAX_CONCURRENT = 64  # requests in flight at once (the server queues the rest itself)


class ServerError(RuntimeError):
    """The server refused or failed a request (its status and message, one line)."""


def _request(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", {}).get("message", detail)
        except (ValueError, AttributeError):
            pass
        raise ServerError(f"{url} answered {exc.code}: {' '.join(str(detail).split())}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ServerError(f"{url} did not answer: {getattr(exc, 'reason', exc)}") from None


def served_model(base_url: str, timeout: float = 30) -> str:
    """The name of the (first) model the server serves."""
    models = _request(f"{base_url.rstrip('/')}/v1/models", None, timeout).get("data") or []
    if not models:
        raise ServerError(f"{base_url} serves no model")
    return models[0]["id"]


def server_extend(base_url: str, model: str, prompt_ids: list[int], eos_token_id: int, *, seed: int,
                  extra: dict | None = None, timeout: float = 600) -> Extend:
    """``chunked_smc``'s proposal: each prefix's next tokens, sampled by the server. ``extra``: more request
    fields (e.g. ``{"vllm_xargs": ...}``), never the sampling parameters above."""
    url = f"{base_url.rstrip('/')}/v1/completions"
    steps = itertools.count()

    def one(step: int, index: int, prefix: Sequence[int], k: int) -> list[int]:
        body = {**(extra or {}), "model": model, "prompt": [*prompt_ids, *prefix], "max_tokens": k,
                **MODEL_SAMPLING, "return_token_ids": True, "seed": (seed * 1_000_003 + step * 1_009 + index) % 2**31}
        choice = _request(url, body, timeout)["choices"][0]
        tokens = [int(t) for t in choice.get("token_ids") or []]
        if choice.get("finish_reason") == "stop":  # ended on one of the server's end tokens: EOS for SMC
            tokens = [*tokens[:-1], eos_token_id] if tokens else [eos_token_id]
        return tokens

    def extend(prefixes: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        step = next(steps)
        with ThreadPoolExecutor(max_workers=min(len(prefixes), MAX_CONCURRENT)) as pool:
            return list(pool.map(lambda args: one(step, *args, k), enumerate(prefixes)))

    return extend


def server_smc(
    base_url: str,
    prompt: str,
    constraint: dict | Constraint | None,
    *,
    tokenizer: Any,
    n_particles: int = 8,
    max_tokens: int = 64,
    chunk_tokens: int = 8,
    ess_threshold: float = 0.5,
    seed: int = 0,
    log_twist: Callable[[Sequence[int]], float] | None = None,
    extra: dict | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> tuple[list[Sample], SMCResult]:
    """Samples of ``prompt``'s continuation from the server at ``base_url`` (e.g. "http://127.0.0.1:8000"),
    properly weighted for the model restricted to ``constraint`` (``{"regex": ...}``, ``{"json_schema":
    ...}``, ``{"lark": ...}``, a ``Constraint``, or None) times exp(``log_twist``). ``tokenizer``: the served
    model's Hugging Face tokenizer (the constraint and the samples' text); ``vocab_size``: the model's, when
larger than the tokenizer's. Best first. Bad arguments are one
    ``SMCArgumentError`` / ``GrammarError`` line before any request; a failing request is a ``ServerError``."""
    check_arguments(n_particles=n_particles, max_tokens=max_tokens, ess_threshold=ess_threshold)
    if isinstance(constraint, dict):
        constraint = constraint_for(constraint, tokenizer, vocab_size or len(tokenizer))
    model = served_model(base_url)
    prompt_ids = tokenizer.encode(prompt)
    extend = server_extend(base_url, model, prompt_ids, tokenizer.eos_token_id, seed=seed, extra=extra)
    result = chunked_smc(extend, constraint, n_particles=n_particles, max_tokens=max_tokens,
                         eos_token_id=tokenizer.eos_token_id, chunk_tokens=chunk_tokens, ess_threshold=ess_threshold,
                         log_twist=log_twist, generator=torch.Generator().manual_seed(seed),
                         on_step=print_progress if progress else None)
    if progress:
        print(file=sys.stderr)
    return weighted_samples(result, tokenizer.decode, tokenizer.eos_token_id), result
