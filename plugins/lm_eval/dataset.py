"""Load a task's jsonl files relative to its yaml, whatever the current directory.

lm-eval 0.4.13 hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves
relative paths against the current directory, so a task folder that ships inside a package breaks as
soon as ``lm_eval`` runs anywhere else. Our task yamls therefore name this function as
``custom_dataset``; lm-eval calls it with the task's metadata and ``dataset_kwargs`` as keyword
arguments, and the metadata carries ``config_source``, the path of the yaml that defined the task.
Without it (another harness version), relative files are looked up in the shipped tasks folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve(name: str, config_source: str | None) -> Path:
    """``name`` as written in the yaml: absolute, relative to the yaml, or a file in the tasks folder."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if config_source and config_source != "inline":
        beside_yaml = Path(config_source).parent / path
        if beside_yaml.is_file():
            return beside_yaml
    shipped = sorted(TASKS_DIR.glob(f"*/{path.as_posix()}"))
    if len(shipped) == 1:
        return shipped[0]
    raise FileNotFoundError(
        f"afterburner lm-eval task data {name!r} not found beside {config_source or '(unknown yaml)'} "
        f"nor in {TASKS_DIR}"
    )


def load_local(*, data_files: Mapping[str, str] | str, config_source: str | None = None, **_metadata: Any):
    """``custom_dataset`` for our task yamls: a ``datasets.DatasetDict`` with one split per data file.

    ``_metadata`` takes whatever else lm-eval passes (task version, model arguments...); it is unused.
    """
    import datasets

    files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_jsonl(resolve(name, config_source))) for split, name in files.items()}
    )
