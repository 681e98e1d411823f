"""What every SGLang-on-CPU engine in these tests shares (the in-process fixture and the subprocess
scripts in ``scripts/``), so their greedy outputs compare token for token. README, Engine notes: CPU needs
SGLANG_USE_CPU_ENGINE=1, device cpu, the torch_native attention backend, the sgl_kernel shim, and a
small KV pool (left alone, the default memory fraction takes ~15 GB of RAM)."""

import json
import os
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "shim"
SCRIPTS = Path(__file__).resolve().parent / "scripts"

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


# ---- the afterburner-sparse / afterburner-squeezed engine runs (scripts/sparse_engine.py) ----

# Quest blocks are 16 tokens here (page_size 1). The budget is absolute: 224 tokens, 14 blocks. It covers
# every sequence of the mixed batch (prompts of 189, 87, 5 and 66 tokens, plus 12 generated), so that
# batch must give the dense output; the long batch (910-token prompts, ~58 blocks) reads about a quarter.
SPARSE_CONFIG = {"attention": {"sparse": {"token_budget": 224, "sink_pages": 1, "recent_pages": 2,
                                          "dense_below_tokens": 64, "dense_layers": 0}}}
# Squeezed at threshold quantile 0 reads every key (the mixed batch must give the dense output); at 0.75
# it reads about a quarter of each long prompt's fixed context.
SQUEEZED_CONFIGS = {quantile: {"attention": {"squeezed": {"threshold_quantile": quantile, "dense_below_tokens": 64,
                                                          "dense_layers": 0}}} for quantile in (0.0, 0.75)}


def numbered_text(lines: int, seed: int) -> str:
    """Varied, deterministic text (a repeated phrase would give the random model a trivial pattern)."""
    return " ".join(f"line {i}: x{i} is {(i * 7 + seed) % 13}." for i in range(lines))


# One prompt under dense_below_tokens: in a batch that runs the selective op it must read every block.
MIXED_PROMPTS = [numbered_text(18, 1), numbered_text(9, 2), "Open the file and", numbered_text(7, 3)]
LONG_PROMPTS = [numbered_text(80, 4), numbered_text(80, 5)]


# ---- speculation through an engine (scripts/spec_engine.py) ----

# Prompts of 4 to 189 tokens, the last one a repeat of the first (a prefix-cache hit), 24 tokens each.
SPEC_PROMPTS = [*PROMPTS, *MIXED_PROMPTS, PROMPTS[0]]
SPEC_GREEDY = {**GREEDY, "max_new_tokens": 24}
# Sampled continuations of one prompt whose tokens 2 and 3 come out of verify steps (token 1: the prefill's).
SPEC_SAMPLES = 240
SPEC_SAMPLING = {"temperature": 0.1, "max_new_tokens": 3, "ignore_eos": True}  # the random model: ~20 bins


def spec_run(model, engine_args: dict, config: dict | None = None, *, retract: bool = False,
             report_dir=None) -> dict:
    """``scripts/spec_engine.py`` in a fresh process (~20-40 s on 2 cores): its RESULT. ``retract``: SGLang's
    own test switch retracts running requests every 3 steps (``SGLANG_TEST_RETRACT``: its ``retract_decode``,
    as when the KV pool runs out), and they run again from their prompt and output so far. With
    ``report_dir``, the result's ``report`` holds afterburner's report events of every engine process."""
    from afterburner.plugins import report
    from support.worker import run_worker_or_fail

    env = {"AFTERBURNER_CONFIG": json.dumps({"afterburner": config or {}}),
           **({"SGLANG_TEST_RETRACT": "1"} if retract else {}),
           **({report.REPORT_DIR_ENV: str(report_dir)} if report_dir else {})}
    result, _ = run_worker_or_fail(SCRIPTS / "spec_engine.py", model, json.dumps(engine_args), env=env,
                                   unset=["AFTERBURNER_DISABLE"], timeout=480)
    return {**result, "report": report.read_dir(report_dir)} if report_dir else result


def cpu_env() -> dict[str, str]:
    """Environment for an SGLang process on this CPU: the shim first on the path, CPU engine on."""
    path = os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": path}


def greedy_ids(engine) -> list[list[int]]:
    return [out["output_ids"] for out in engine.generate(PROMPTS, dict(GREEDY))]


def cli_flags() -> list[str]:
    """ENGINE_KWARGS as ``launch_server`` flags (a True boolean is a bare switch)."""
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in ENGINE_KWARGS.items()]


def engine_run(model, method: str, config: dict, report_dir) -> dict:
    """``scripts/sparse_engine.py`` with ``--attention-backend afterburner-<method>`` in a fresh process
    (~1.5-2.5 min on 2 cores, mostly engine start): its RESULT."""
    # imported here: the scripts import this module outside pytest, where ``support`` is not on the path
    from afterburner.plugins import report
    from support.worker import run_worker_or_fail

    env = {"AFTERBURNER_CONFIG": json.dumps(config), report.REPORT_DIR_ENV: str(report_dir)}
    result, _ = run_worker_or_fail(SCRIPTS / "sparse_engine.py", model, method, env=env,
                                   unset=["AFTERBURNER_DISABLE"], timeout=480)
    return result
