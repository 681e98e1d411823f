"""SpecPC for vLLM offline use: compress prompts with a draft model, then pass them to ``LLM.generate``.

    from afterburner.plugins.vllm.specpc import compress_prompts
    prompts = compress_prompts("drafts/smollm2-l25", ["...long prompt..."], capacity=1024)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

The draft runs in the caller's process, on CPU with transformers (``afterburner.spec_decode.draft``), before
the engine sees the request; the engine gets plain ``TokensPrompt``s. Strings are tokenized with the draft's
tokenizer the way vLLM tokenizes them (special tokens added), so a capacity >= the prompt's length gives the
engine exactly the tokens it would have made itself. Not done: per-request ``vllm_xargs`` on ``vllm serve``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from afterburner.spec_decode.draft.specpc import SpecPCSettings
from afterburner.spec_decode.draft.specpc_draft import Compressed, Draft, compress_ids, load_draft

_drafts: dict[Path, Draft] = {}  # loaded drafts by resolved folder: loading costs seconds


def _draft(draft_dir: str | Path) -> Draft:
    path = Path(draft_dir).resolve()
    if path not in _drafts:
        _drafts[path] = load_draft(path)
    return _drafts[path]


def compress(draft_dir: str | Path, prompts: Sequence[str | Sequence[int] | dict], capacity: int,
             settings: SpecPCSettings | None = None) -> list[Compressed]:
    """SpecPC on each prompt (a string, token ids, or a ``TokensPrompt``-like dict with ``prompt_token_ids``)."""
    settings = replace(settings or SpecPCSettings(capacity=capacity), capacity=capacity)
    draft = _draft(draft_dir)
    results = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = draft.tokenizer(prompt).input_ids
        elif isinstance(prompt, dict):
            ids = prompt["prompt_token_ids"]
        else:
            ids = prompt
        results.append(compress_ids(draft, ids, settings))
    return results


def compress_prompts(draft_dir: str | Path, prompts: Sequence[str | Sequence[int] | dict], capacity: int,
                     settings: SpecPCSettings | None = None) -> list:
    """``TokensPrompt``s for ``LLM.generate``: each prompt's kept tokens (see ``compress``)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=r.token_ids) for r in compress(draft_dir, prompts, capacity, settings)]
