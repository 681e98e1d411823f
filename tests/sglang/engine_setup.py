"""What every SGLang-on-CPU engine in these tests shares (the in-process fixture and the subprocess
scripts), so their greedy outputs compare token for token. ENGINE_NOTES, "SGLang": CPU needs
SGLANG_USE_CPU_ENGINE=1, device cpu, the torch_native attention backend, the sgl_kernel shim, and a
small KV pool (left alone, the default memory fraction takes ~15 GB of RAM)."""

import json
import os
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "shim"

PROMPTS = ["The module provides", "Return a new list of", "Open the file and"]
MAX_NEW_TOKENS = 12
# ignore_eos: the random tiny model may emit </s> early; fixed lengths make the comparison stricter.
GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
ENGINE_KWARGS = dict(
    device="cpu",
    attention_backend="torch_native",
    dtype="float32",
    max_total_tokens=2048,
    context_length=1024,
    random_seed=0,
    # Without it the idle scheduler polls in a busy loop and takes a whole core of the two.
    sleep_on_idle=True,
    # Lets requests name a custom logit processor (AWRS); requests that name none run as before.
    enable_custom_logit_processor=True,
)
# Non-default values: seeing them in a process proves AFTERBURNER_CONFIG travelled there.
AFTERBURNER_SECTION = {"attention": {"sparse": {"budget_ratio": 0.125, "recent_pages": 3}}}
AFTERBURNER_CONFIG = json.dumps({"afterburner": AFTERBURNER_SECTION})


def cpu_env() -> dict[str, str]:
    """Environment for an SGLang process on this CPU: the shim first on the path, CPU engine on."""
    path = os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": path}


def greedy_ids(engine) -> list[list[int]]:
    return [out["output_ids"] for out in engine.generate(PROMPTS, dict(GREEDY))]


def cli_flags() -> list[str]:
    """ENGINE_KWARGS as ``launch_server`` flags (a True boolean is a bare switch)."""
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in ENGINE_KWARGS.items()]
