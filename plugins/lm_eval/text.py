"""Local English text for tasks and tokenizers: docstrings of a fixed set of standard-library modules.

They ship with every CPython, need no download, and are stable across patch releases of a Python
version; the sentence list is sorted and deduplicated so that seeded sampling from it is repeatable.

The docstrings are read in a clean interpreter (``python -I -S``, stdlib only): read in-process, they
depend on what else was imported first (``typing_extensions`` replaces three private ``typing``
helpers, whose docstrings then vanish), so pytest and the command line saw 846 and 849 sentences.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import subprocess
import sys

MODULES = (
    "argparse", "collections", "csv", "datetime", "decimal", "difflib", "email", "fractions",
    "functools", "heapq", "http.client", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module_name: str):
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for _, member in sorted(vars(module).items()):
        if getattr(member, "__module__", None) == module.__name__ and (doc := inspect.getdoc(member)):
            yield doc


def local_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Plain prose sentences (no code, no tables), sorted and unique; the same in every process."""
    return list(_clean_interpreter_sentences(min_words, max_words))


@functools.cache
def _clean_interpreter_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    # -I: no environment variables, user site or script folder on sys.path; -S: no site-packages.
    command = [sys.executable, "-I", "-S", __file__, str(min_words), str(max_words)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


def _sentences_in_this_process(min_words: int, max_words: int) -> list[str]:
    found = set()
    for name in MODULES:
        for doc in _docstrings(name):
            for paragraph in doc.split("\n\n"):
                if any(mark in paragraph for mark in (">>>", "::", "  ", "|", "=")):
                    continue
                for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                    words = sentence.split()
                    if (
                        min_words <= len(words) <= max_words
                        and sentence[0].isupper()
                        and sentence.endswith(".")
                        and sentence.isascii()
                    ):
                        found.add(sentence)
    return sorted(found)


if __name__ == "__main__":
    print(json.dumps(_sentences_in_this_process(int(sys.argv[1]), int(sys.argv[2]))))
