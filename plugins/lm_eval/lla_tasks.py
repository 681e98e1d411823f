"""lm-eval tasks for the models ``afterburner train lla`` writes: held-out MQAR and in-context regression.

One document per scored position of a held-out task instance (the instances ``evaluate`` draws, so the
engine's answers can be checked against the training code's model on the very same prompts): the prompt is
the instance's words up to and including the query (an MQAR query key, or a regression x), the target the
next word (its value, or the tokenized y). The model's word-level tokenizer prepends ``<s>`` as in training.
Answers are one greedy token (``max_gen_toks: 1``) over the whole vocabulary, the engine's plain greedy.

- ``afterburner_lla_mqar_<pairs>``: ``exact_match`` (recall accuracy).
- ``afterburner_lla_regression_<points>``: ``mse`` (squared error of the answered grid number against the
  exact a x + b; an answer that is not a number counts as 0, the no-context guess, and is counted in
  ``non_number``) and ``exact_match`` (the tokenized y itself).

Documents are generated when lm-eval loads a task (``load``: seeded, no data files shipped); each size holds
enough instances for about ``QUERIES`` scored queries. Queries of one instance share its context, so they
are not independent samples: results state instances as well as queries.
"""

from __future__ import annotations

import math
import re
from typing import Any

GROUP = "afterburner_lla"
MQAR_PAIRS = (4, 8, 16, 24, 32)  # trained on 4..16 pairs (``TrainConfig``): 24 and 32 are longer than training
REGRESSION_POINTS = (8, 16, 24, 32)  # trained on 8..24 points
QUERIES = 512  # scored queries per task size, about (whole instances)
LOADER = "afterburner.plugins.lm_eval.lla_tasks.load"
RESULTS = {"mqar": "afterburner.plugins.lm_eval.lla_tasks.mqar_results",
           "regression": "afterburner.plugins.lm_eval.lla_tasks.regression_results"}
_NUMBER = re.compile(r"^n([0-9]+)$")


def task_name(task: str, size: int) -> str:
    return f"{GROUP}_{task}_{size}"


def all_tasks() -> list[tuple[str, int]]:
    return [("mqar", p) for p in MQAR_PAIRS] + [("regression", n) for n in REGRESSION_POINTS]


def scored_per_instance(task: str, size: int) -> int:
    from afterburner.attention_backends.local_linear.tasks import FIRST_SCORED_PAIR

    return size if task == "mqar" else size - FIRST_SCORED_PAIR


def instances_for(task: str, size: int, queries: int = QUERIES) -> int:
    return math.ceil(queries / scored_per_instance(task, size))


def docs(task: str, size: int, instances: int, seed: int = 0) -> list[dict[str, Any]]:
    """The documents of one task size: ``prompt`` (words, no ``<s>``), ``target`` (a word), ``instance``,
    ``position`` (token index of the query in the instance, ``<s>`` at 0) and, for regression, ``truth``."""
    from afterburner.attention_backends.local_linear.evaluate import heldout_batch
    from afterburner.attention_backends.local_linear.tasks import IGNORE, VOCAB, describe

    batch = heldout_batch(task, size=size, instances=instances, seed=seed)
    out = []
    for row in range(batch.tokens.shape[0]):
        for position in (batch.targets[row] != IGNORE).nonzero().flatten().tolist():
            doc = {"prompt": describe(batch.tokens[row, 1:position + 1]),
                   "target": VOCAB[int(batch.targets[row, position])], "instance": row, "position": position}
            if batch.truth is not None:
                doc["truth"] = float(batch.truth[row, position])
            out.append(doc)
    return out


def load(*, task: str, size: int, instances: int, seed: int = 0, **_metadata: Any):
    """``custom_dataset`` of the task yamls (lm-eval passes ``dataset_kwargs`` and its metadata)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs(task, int(size), int(instances),
                                                                         int(seed)))})


def number_value(word: str) -> float | None:
    """The grid number a word ``n<i>`` stands for, or None when the word is not a number token."""
    from afterburner.attention_backends.local_linear.tasks import NUM_BINS, bin_values

    match = _NUMBER.match(word.strip())
    if match is None or int(match.group(1)) >= NUM_BINS:
        return None
    return float(bin_values()[int(match.group(1))])


def mqar_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``process_results`` of the MQAR tasks: the generated word (spaces aside) is the value."""
    return {"exact_match": float(bool(results) and results[0].strip() == doc["target"])}


def regression_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``process_results`` of the regression tasks: one generated word -> the three metrics."""
    answer = results[0].strip() if results else ""
    value = number_value(answer)
    return {"mse": ((0.0 if value is None else value) - doc["truth"]) ** 2,
            "exact_match": float(answer == doc["target"]), "non_number": float(value is None)}


def task_yaml(header: str, task: str, size: int, seed: int) -> str:
    name = task_name(task, size)
    metrics = (("exact_match", True),) if task == "mqar" else (("mse", False), ("exact_match", True),
                                                               ("non_number", False))
    text = (
        header
        + f"task: {name}\n"
        + "dataset_path: json\n"
        + "dataset_kwargs:\n"
        + f"  task: {task}\n  size: {size}\n  instances: {instances_for(task, size)}\n  seed: {seed}\n"
        + f"custom_dataset: !function {LOADER}\n"
        + "test_split: test\n"
        + "output_type: generate_until\n"
        + 'doc_to_text: "{{prompt}}"\n'
        + "doc_to_target: target\n"
        + "generation_kwargs:\n"
        + "  until: []\n"
        + "  max_gen_toks: 1\n"
        + "  do_sample: false\n"
        + "  temperature: 0.0\n"
    )
    text += f"process_results: !function {RESULTS[task]}\nmetric_list:\n"
    for metric, higher in metrics:
        text += f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: {str(higher).lower()}\n"
    return text + f"metadata:\n  version: 1.0\n  seq_len_of_instance: {seq_len(task, size)}\n"


def seq_len(task: str, size: int) -> int:
    """Tokens in one instance of the task size (``<s>`` included)."""
    return 1 + (4 if task == "mqar" else 2) * size


def group_yaml(header: str) -> str:
    tasks = "".join(f"  - {task_name(t, s)}\n" for t, s in all_tasks())
    return header + f"group: {GROUP}\ntask:\n{tasks}metadata:\n  version: 1.0\n"


def files(header: str, seed: int) -> dict[str, str]:
    """``{relative path: text}`` of the task folder (yamls only; documents are generated at load)."""
    out = {f"{GROUP}/_{GROUP}.yaml": group_yaml(header)}
    for task, size in all_tasks():
        out[f"{GROUP}/{task_name(task, size)}.yaml"] = task_yaml(header, task, size, seed)
    return out
