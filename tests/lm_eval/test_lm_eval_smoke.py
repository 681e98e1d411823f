"""lm-eval's own command line on the shipped tasks, through vLLM with afterburner, on the tiny model.

lm-eval runs in a subprocess: an engine in this process would share it with the vLLM tests' session
engine. The subprocess is one vLLM process (``uni`` executor, no V1 multiprocessing); afterburner's
report files in ``AFTERBURNER_REPORT_DIR`` show what the plugin did inside it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from afterburner.plugins import report
from afterburner.plugins.lm_eval import make_tasks, run

pytestmark = pytest.mark.vllm

LIMIT = 2
# A non-default setting, to see the config travel lm-eval -> vllm.LLM -> additional_config -> worker.
AFTERBURNER = {"attention": {"sparse": {"budget_ratio": 0.5}}}


@pytest.fixture(scope="module")
def lm_eval_run(tiny_model, tmp_path_factory):
    pytest.importorskip("lm_eval")
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("lm_eval_smoke")
    args = run.model_args(tiny_model, afterburner=AFTERBURNER, max_model_len=4096, single_process=True)
    command = run.cli_command(
        [make_tasks.MC_TASK, make_tasks.PASSKEY_GROUP], args, limit=LIMIT, output_path=root / "out"
    )
    env = {
        **os.environ,
        report.REPORT_DIR_ENV: str(root / "report"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    }
    done = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"lm_eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results_files = sorted((root / "out").rglob("results_*.json"))
    assert results_files, f"no results JSON under {root / 'out'}:\n{done.stderr[-3000:]}"
    return json.loads(results_files[-1].read_text()), report.read_dir(root / "report")


def test_results_hold_both_tasks_and_their_metrics(lm_eval_run):
    results, _ = lm_eval_run
    scores = run.scores(results)
    assert set(scores[make_tasks.MC_TASK]) == {"acc", "acc_norm"}
    for length in make_tasks.DEFAULT_LENGTHS:
        task = make_tasks.passkey_task(length)
        assert set(scores[task]) == {"exact_match"}
        assert f"exact_match,{make_tasks.PASSKEY_FILTER}" in results["results"][task]
        assert results["n-samples"][task]["effective"] == LIMIT
    assert results["n-samples"][make_tasks.MC_TASK]["effective"] == LIMIT
    assert make_tasks.PASSKEY_GROUP in results["groups"]
    for values in scores.values():
        assert all(0.0 <= value <= 1.0 for value in values.values())


def test_afterburner_registered_inside_the_engine_process(lm_eval_run):
    _, events = lm_eval_run
    assert events, "the engine process wrote no afterburner report"
    assert all(event["pid"] != os.getpid() for event in events)
    registered = [e for e in events if e["event"] == "registered" and e["engine"] == "vllm"]
    assert registered, [e["event"] for e in events]
    configs = {e["where"]: e["config"] for e in events if e["event"] == "config"}
    assert set(configs) == {"engine_config", "worker"}
    for config in configs.values():
        assert config["attention"]["sparse"]["budget_ratio"] == 0.5
