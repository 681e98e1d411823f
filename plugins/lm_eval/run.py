"""Run afterburner's shipped lm-eval tasks through vLLM with afterburner, offline.

Two routes to the same evaluation:

- ``cli_command(...)``: the ``lm_eval`` command line. lm-eval 0.4.13 takes ``--model_args`` as one JSON
  object, which is how ``additional_config={"afterburner": {...}}`` (a nested dict) reaches
  ``vllm.LLM``: the ``key=value,...`` form splits on top-level commas only, but parses values with
  ``ast.literal_eval``, so JSON's ``true``/``false`` would arrive as a string.
- ``evaluate(...)``: ``lm_eval.simple_evaluate`` in this process, with model_args as a dict and a task
  manager that indexes only our tasks (skipping lm-eval's ~10k built-in yamls).

Both point ``include_path`` at the tasks folder inside the installed package (``dataset.TASKS_DIR``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from afterburner.plugins.config import ADDITIONAL_CONFIG_KEY, parse_config
from afterburner.plugins.lm_eval.dataset import TASKS_DIR

# vLLM on a CPU (README, Engine notes): float32, no torch.compile warm-up.
CPU_DEFAULTS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True}


def model_args(
    pretrained: str | Path,
    *,
    afterburner: Mapping[str, Any] | None = None,
    max_model_len: int | None = None,
    single_process: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """lm-eval's ``vllm`` model arguments; ``afterburner`` is validated here, before any engine starts.

    ``single_process``: vLLM's ``uni`` executor (also set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the
    environment for a single process; quicker to start, good for tests).
    """
    args: dict[str, Any] = {"pretrained": str(pretrained), **CPU_DEFAULTS}
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    if afterburner is not None:
        parse_config(afterburner, source="lm-eval model_args")
        args["additional_config"] = {ADDITIONAL_CONFIG_KEY: dict(afterburner)}
    if single_process:
        args["distributed_executor_backend"] = "uni"
    args.update(extra)
    return args


def cli_command(
    tasks: Sequence[str],
    args: Mapping[str, Any],
    *,
    limit: float | None = None,
    output_path: str | Path | None = None,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m lm_eval run --model vllm --model_args '<json>' --include_path <tasks> --tasks ...``."""
    command = [
        python, "-m", "lm_eval", "run",
        "--model", "vllm",
        "--model_args", json.dumps(dict(args)),
        "--include_path", str(TASKS_DIR),
        "--tasks", *tasks,
        "--batch_size", "auto",
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    if output_path is not None:
        command += ["--output_path", str(output_path)]
    return command + list(extra)


def evaluate(
    tasks: Sequence[str],
    args: Mapping[str, Any],
    *,
    limit: float | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on our tasks in this process (create engines under ``__main__``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=dict(args))
    return simple_evaluate(
        model="vllm",
        model_args=dict(args),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        batch_size="auto",
        **simple_evaluate_kwargs,
    )


def scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, without stderr entries or aliases.

    lm-eval keys metrics as ``"<metric>,<filter>"``; the filter name is dropped (one filter per task).
    """
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if _filter and not name.endswith("_stderr") and isinstance(value, (int, float)):
                table.setdefault(task, {})[name] = float(value)
    return table
