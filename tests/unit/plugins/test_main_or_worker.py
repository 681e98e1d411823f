"""A benchmark script's entry point: ``--worker`` runs its worker with the typed flags it declares, anything
else runs its main."""

import sys

import pytest

from afterburner.plugins.devtools.worker import main_or_worker


def test_worker_flags_are_parsed_with_their_types(monkeypatch):
    argv = ["bench.py", "--worker", "--model", "M", "--contexts", "960", "4096", "--decode-tokens", "32"]
    monkeypatch.setattr(sys, "argv", argv)
    args = main_or_worker(lambda: pytest.fail("main ran"), lambda parsed: parsed, model=str,
                          contexts=(int, "+"), decode_tokens=int)
    assert (args.worker, args.model, args.contexts, args.decode_tokens) == (True, "M", [960, 4096], 32)


def test_without_worker_main_runs(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--contexts", "960"])
    assert main_or_worker(lambda: "main", lambda parsed: pytest.fail("worker ran"), contexts=(int, "+")) == "main"


def test_an_undeclared_worker_flag_is_an_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--worker", "--unknown", "1"])
    with pytest.raises(SystemExit):
        main_or_worker(lambda: None, lambda parsed: parsed, model=str)
