"""SpecPC and SpecKV drafts of served requests, run off the API server's event loop.

Under ``vllm serve`` the OpenAI server tokenizes a request itself and hands vLLM's ``AsyncLLM.add_request`` a
token prompt, which vLLM turns into an engine request synchronously, on the event loop: a draft run there
(seconds on CPU for a long prompt) would stall every other request's stream. So before ``add_request``
(patch ``vllm.async_drafts``) a request that asks for SpecPC or SpecKV has its draft run on afterburner's
draft thread while the loop keeps serving; the result waits in the request's task context, and the
``vllm.prompt_compression`` hook (``specpc`` / ``speckv.on_process_inputs``) takes it instead of drafting
again. Elsewhere (``LLM.generate``, raw prompts that vLLM already processes on its renderer's threads) the
hook drafts where it runs, as before. Drafts run one at a time (``draft_requests``). What runs, in which
order, is ``speckv.request_drafts``; this module only moves it off the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any

from afterburner.plugins import report
from afterburner.plugins.draft_requests import DRAFT_EXECUTOR
from afterburner.plugins.log import get_logger

logger = get_logger(__name__)
# method -> (the prompt it read, the result or the exception it raised, the thread it ran on): ``drafts``' result
_READY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("afterburner_drafted", default=None)
_warned_mismatch = False


async def before_add_request(engine: Any, request_id: str, prompt: Any, params: Any, *_args: Any,
                             admit: Callable[[Any, Any], None], drafts: Callable[[Any, list[int], dict], dict],
                             **_kwargs: Any) -> None:
    """Before ``AsyncLLM.add_request``: ``drafts(vllm_config, prompt ids, extra_args)`` of a token prompt on
    the draft thread (the loop awaits it), for a request ``admit(input_processor, params)`` lets through (one it
    refuses is refused where vLLM checks requests, with its one line, without a draft run)."""
    extra = getattr(params, "extra_args", None)
    _READY.set(None)
    if not extra or not (isinstance(prompt, dict) and prompt.get("type") == "token"):
        return  # raw prompts: vLLM processes them (and the hook drafts) on its renderer's thread already
    try:
        admit(engine.input_processor, params)
    except ValueError:
        return
    ids = list(prompt["prompt_token_ids"])
    _READY.set(await asyncio.get_running_loop().run_in_executor(DRAFT_EXECUTOR, drafts, engine.vllm_config, ids, extra))


def take(method: str, prompt: list[int], draft: Callable[[], Any]) -> tuple[Any, str]:
    """(``method``'s result for ``prompt``, the thread its draft ran on): what the draft thread found for
    this request, else ``draft()`` run here."""
    global _warned_mismatch
    ready = _READY.get() or {}
    found = ready.pop(method, None)
    if found is not None and found[0] == prompt:
        if isinstance(found[1], Exception):
            raise found[1]
        return found[1], found[2]
    if found is not None:  # vLLM changed the prompt between add_request and the request: draft again, here
        report.record("draft_on_loop", method=method, reason="prompt changed")
        if not _warned_mismatch:
            _warned_mismatch = True
            logger.warning("afterburner: %s drafted a prompt vLLM then changed; drafting again where the request "
                           "is made (this stalls the server's other requests for the draft's time)", method)
    return draft(), threading.current_thread().name
