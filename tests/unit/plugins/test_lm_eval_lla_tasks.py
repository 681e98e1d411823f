"""The lm-eval tasks of the ``train lla`` models, without an engine: their documents are the held-out
instances' scored queries, lm-eval loads them from the shipped yamls, and the metric functions score
answers as the torch evaluation does."""

from __future__ import annotations

import pytest

from afterburner.attention_backends.local_linear.evaluate import heldout_batch
from afterburner.attention_backends.local_linear.tasks import IGNORE, VOCAB, bin_values
from afterburner.plugins.lm_eval import lla_tasks
from afterburner.plugins.lm_eval.dataset import TASKS_DIR


@pytest.mark.parametrize(("task", "size"), [("mqar", 8), ("regression", 16)])
def test_each_document_is_one_scored_query_of_a_heldout_instance(task, size):
    instances = lla_tasks.instances_for(task, size)
    docs = lla_tasks.docs(task, size, instances)
    batch = heldout_batch(task, size=size, instances=instances)
    assert len(docs) == int((batch.targets != IGNORE).sum()) == instances * lla_tasks.scored_per_instance(task, size)
    assert len(docs) >= lla_tasks.QUERIES
    for doc in docs:
        row, pos = doc["instance"], doc["position"]
        words = doc["prompt"].split()
        assert words == [VOCAB[int(t)] for t in batch.tokens[row, 1:pos + 1]]  # <s> is the tokenizer's
        assert doc["target"] == VOCAB[int(batch.tokens[row, pos + 1])]
        if task == "mqar":  # the query key was seen once before, with its value right after it
            first = words.index(words[-1])
            assert first < len(words) - 1 and words[first + 1] == doc["target"]
        else:
            assert abs(doc["truth"] - float(batch.truth[row, pos])) < 1e-6
            grid_step = float(bin_values()[1] - bin_values()[0])
            assert abs(lla_tasks.number_value(doc["target"]) - doc["truth"]) <= grid_step / 2 + 1e-6


def test_documents_do_not_depend_on_the_call():
    assert lla_tasks.docs("mqar", 4, 3) == lla_tasks.docs("mqar", 4, 3)
    assert lla_tasks.docs("mqar", 4, 3, seed=1) != lla_tasks.docs("mqar", 4, 3)


def test_metric_functions():
    mqar = {"target": "v17"}
    assert lla_tasks.mqar_results(mqar, [" v17"]) == {"exact_match": 1.0}
    assert lla_tasks.mqar_results(mqar, ["v1"]) == {"exact_match": 0.0}
    assert lla_tasks.mqar_results(mqar, []) == {"exact_match": 0.0}
    grid = bin_values()
    doc = {"target": "n40", "truth": float(grid[40]) + 0.01}
    right = lla_tasks.regression_results(doc, ["n40"])
    assert right["exact_match"] == 1.0 and right["non_number"] == 0.0 and right["mse"] == pytest.approx(1e-4)
    wrong = lla_tasks.regression_results(doc, [" n0"])
    assert wrong["exact_match"] == 0.0 and wrong["mse"] == pytest.approx((-1.0 - doc["truth"]) ** 2)
    word = lla_tasks.regression_results(doc, ["k3"])  # not a number: the predict-0 error, counted
    assert word["non_number"] == 1.0 and word["mse"] == pytest.approx(doc["truth"] ** 2)
    assert lla_tasks.number_value("n64") is None and lla_tasks.number_value("n63") == pytest.approx(1.0)


def test_lm_eval_loads_the_shipped_tasks(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([lla_tasks.GROUP])
    assert set(loaded["tasks"]) == {lla_tasks.task_name(t, s) for t, s in lla_tasks.all_tasks()}
    task = loaded["tasks"][lla_tasks.task_name("regression", 8)]
    docs = list(task.test_docs())
    assert docs == lla_tasks.docs("regression", 8, lla_tasks.instances_for("regression", 8))
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"] and task.doc_to_target(docs[0]) == docs[0]["target"]
    assert task.config.generation_kwargs["max_gen_toks"] == 1
    assert set(task.process_results(docs[0], [docs[0]["target"]])) == {"mse", "exact_match", "non_number"}


def test_the_model_tokenizer_reads_a_prompt_as_training_did():
    pytest.importorskip("tokenizers")
    from afterburner.plugins.cli.lla_export import build_tokenizer

    doc = lla_tasks.docs("mqar", 4, 1)[0]
    batch = heldout_batch("mqar", size=4, instances=1)
    ids = build_tokenizer()(doc["prompt"]).input_ids
    assert ids == batch.tokens[0, :doc["position"] + 1].tolist()  # <s> first, then the prompt's words
