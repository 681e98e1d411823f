"""Per-request admission in the process that takes requests (``vllm serve``'s API server, ``LLM(...)``):
afterburner refuses, with a 400 for that request alone, what the engine would otherwise serve silently
without the method the request asked for (``plugins/vllm/composition.py``)."""

from afterburner.patches.base import Patch

REQUEST_ADMISSION = Patch(
    name="vllm.request_admission",
    target="vllm.v1.engine.input_processor:InputProcessor._validate_params",
    verified_on=">=0.32.0,<0.34",
    when="before",  # hook(input_processor, params, supported_tasks); a ValueError is vLLM's 400
    expects_params=("self", "params", "supported_tasks"),
)
