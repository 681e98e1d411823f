"""Register a fixed context ahead of time for Squeezed Attention (``attention.method: "squeezed"``).

Squeezed Attention clusters a context's keys once and reuses the centroids for every request that starts
with it. In vLLM the index is built inside the engine at the first decode steps after the context's
prefill (a few layers per step: ``index_builds_per_step``), and found again through the prefix cache, so
registering a context is: prefill it and decode enough tokens for every layer's build. Later requests that
start with the same text (same tokens, prefix caching on) reuse its index.

    register_fixed_context(llm, [text, ...])                         # an in-process ``vllm.LLM``
    afterburner squeeze --url http://127.0.0.1:8000 FILE [FILE ...]   # a running ``vllm serve``
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

# The prefill samples token 1; the indexes are built at the decode steps after it, ``index_builds_per_step``
# layers a step (default 4): 32 decode steps cover 128 layers, whatever the model writes (EOS ignored).
_MAX_TOKENS = 33


def _progress(items: list, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="context", file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm ships with vLLM
        return items


def register_fixed_context(llm, contexts: Iterable[str], *, progress: bool = True) -> int:
    """Prefill each context in ``llm`` (squeezed attention and prefix caching on) and build its index;
    returns how many contexts were registered."""
    from vllm import SamplingParams

    contexts = list(contexts)
    params = SamplingParams(temperature=0, max_tokens=_MAX_TOKENS, ignore_eos=True)
    for text in _progress(contexts, "squeezed index") if progress else contexts:
        llm.generate([text], params, use_tqdm=False)
    return len(contexts)


def register_files_on_server(url: str, model: str | None, files: list[Path]) -> int:
    """The CLI's path: each file's text as one completion request to a running ``vllm serve``."""
    import json
    import urllib.request

    for path in _progress(files, "squeezed index"):
        body = {"prompt": path.read_text(), "max_tokens": _MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        if model:
            body["model"] = model
        request = urllib.request.Request(f"{url.rstrip('/')}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
    return len(files)
