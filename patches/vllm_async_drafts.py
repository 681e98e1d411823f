"""SpecPC / SpecKV drafts off the API server's event loop: before ``AsyncLLM.add_request`` takes a request that
asks for a draft method, afterburner runs the draft on its own thread and awaits it
(``plugins/vllm/draft_off_loop.py``); the ``vllm.prompt_compression`` hook then applies what it found
instead of running the draft where vLLM calls it (on the event loop, for prompts the OpenAI server has
already tokenized)."""

from afterburner.patches.base import Patch

ASYNC_DRAFTS = Patch(
    name="vllm.async_drafts",
    target="vllm.v1.engine.async_llm:AsyncLLM.add_request",
    verified_on=">=0.32.0,<0.34",
    when="before_async",  # await hook(async_llm, request_id, prompt, params, ...)
    expects_params=("self", "request_id", "prompt", "params"),
)
