"""SpecPC per request: after vLLM has turned a request into an ``EngineCoreRequest`` (in the process that
takes requests), afterburner replaces the prompt's token ids with the ones a draft model keeps
(``plugins/vllm/specpc.py``), before the request reaches the engine and the output processor."""

from afterburner.patches.base import Patch

PROMPT_COMPRESSION = Patch(
    name="vllm.prompt_compression",
    target="vllm.v1.engine.input_processor:InputProcessor.process_inputs",
    verified_on=">=0.32.0,<0.34",
    when="after",  # hook(request, input_processor, request_id, prompt, params, ...); a ValueError is vLLM's 400
    expects_params=("self", "request_id", "prompt", "params"),
)
