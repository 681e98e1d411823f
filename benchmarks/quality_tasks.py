"""The two retrieval tasks of the draft-guided quality benchmarks (``specpc_quality.py``,
``speckv_quality.py``, ``--task``), each a document set, a way to answer and a way to grade.

- ``passkey``: the pass-key documents of ``passkey_serve.py``; the answer is 16 free greedy tokens and
  passes when its first 5-digit number is the key.
- ``mc``: long-context multiple choice (``generators.colour_docs``): four people's favourite colours in
  filler prose, a question about one of them, four choices (the four colours). The prompt ends at
  "Answer:" and the answer is constrained by vLLM's structured outputs (``choice``) to
  "<answer start> <colour>": the forced start ("The favourite colour of NAME is") runs through decode
  steps, so the colour, the only choice the grammar leaves open, is picked by a decode step (greedy:
  the most likely of the four colour tokens) over whatever the method kept, not by the dense prefill.
  Chance is 1/4.
"""

from __future__ import annotations

import re
from pathlib import Path

TASKS = ("passkey", "mc")


def documents(task: str, tokenizer, lengths: list[int], n_docs: int, seed: int) -> list[dict]:
    """Docs with ``prompt`` (text), ``choices`` (the allowed answers, or None for free text), ``length``,
    ``id``, ``depth`` and what ``correct`` grades against."""
    if task == "passkey":
        from passkey_serve import documents as passkey_documents

        return [{**doc, "choices": None} for doc in passkey_documents(tokenizer, lengths, n_docs, seed)]
    from afterburner.plugins.lm_eval import generators
    from afterburner.plugins.lm_eval.text import local_sentences

    filler = generators.colour_filler(local_sentences())
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    docs = []
    for length in lengths:
        for doc in generators.colour_docs(filler, length=length, n_docs=n_docs, seed=seed, count=count):
            docs.append({**doc, "prompt": f"{doc['context']}\n{doc['question']}",
                         "choices": [doc["answer_start"] + choice for choice in doc["choices"]]})
    return docs


def correct(doc: dict, answer: str) -> bool:
    if doc["choices"] is not None:
        return answer == doc["choices"][doc["label"]]
    found = re.search(r"\d{5}", answer)
    return bool(found and found.group(0) == doc["passkey"])


def sampling(choices: list[str] | None):
    """The engine's greedy sampling for one prompt (16 tokens; constrained to ``choices`` when given)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    constraint = StructuredOutputsParams(choice=choices) if choices else None
    return SamplingParams(temperature=0, max_tokens=16, structured_outputs=constraint)


def out_path(default: str, task: str) -> str:
    """The task's results file: ``default`` for passkey, ``<stem>_mc.json`` beside it for mc."""
    path = Path(default)
    return str(path if task == "passkey" else path.with_name(f"{path.stem}_{task}{path.suffix}"))
