"""Run greedy generation in a fresh process and print the token ids as JSON (one process engine).

    python tests/vllm/scripts/greedy.py MODEL_DIR [--unsupported | --not-installed]

``--unsupported`` makes afterburner's compat table exclude this vLLM before the engine loads plugins,
so the plugin must register nothing and the engine must behave exactly as stock.
``--not-installed`` hides afterburner's entry points from vLLM (general plugin and logits processor):
vLLM exactly as without the package.
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/vllm: engine_args
    from engine_args import AFTERBURNER_SECTION, ENGINE_KWARGS, MAX_TOKENS, PROMPTS

    if "--unsupported" in sys.argv:
        from packaging.specifiers import SpecifierSet

        from afterburner.plugins import compat

        compat.SUPPORTED_RANGES["vllm"] = SpecifierSet(">=99")
    if "--not-installed" in sys.argv:
        import vllm.v1.sample.logits_processor as logitsprocs

        os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"
        loaded = logitsprocs._load_logitsprocs_plugins
        logitsprocs._load_logitsprocs_plugins = lambda: [
            cls for cls in loaded() if not cls.__module__.startswith("afterburner.")
        ]
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], additional_config={"afterburner": AFTERBURNER_SECTION}, **ENGINE_KWARGS)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    print_result([list(o.outputs[0].token_ids) for o in outputs])
