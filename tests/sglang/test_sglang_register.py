"""register() against the real sglang modules, in this process: it applies its patch once, and where
afterburner must not act (unsupported sglang, a patch target that moved, the off switch) it logs one
line and leaves SGLang's method the original."""

import logging
import time

import pytest
from packaging.specifiers import SpecifierSet
from sglang.srt.server_args import ServerArgs

import afterburner.plugins.sglang as adapter
from afterburner.patches import SGLANG_PATCHES
from afterburner.patches import base as patching
from afterburner.plugins import compat, report
from afterburner.plugins.config import ConfigError

pytestmark = pytest.mark.sglang


@pytest.fixture
def stock(monkeypatch):
    """This process as if register() had never run here (the session engine's may have): SGLang's
    original methods, an empty patch table, our flag unset. Everything comes back afterwards. Yields the
    original ``check_server_args``."""
    for patch in SGLANG_PATCHES:
        owner, attr = patching._resolve(patch.target)
        original = owner.__dict__[attr]
        monkeypatch.setattr(owner, attr, getattr(original, "__wrapped__", original))
    stock_method = ServerArgs.__dict__["check_server_args"]
    monkeypatch.setattr(patching, "_applied", {})
    monkeypatch.setattr(adapter, "_active", None)
    monkeypatch.delenv("AFTERBURNER_DISABLE", raising=False)
    yield stock_method
    patching.revert_all()


@pytest.fixture
def log_lines():
    """What afterburner logs (its logger does not propagate, so caplog cannot see it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("afterburner")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _new_events(since):
    """Events recorded at or after ``since`` (a time.time()); the in-memory record is bounded."""
    return [e for e in report.events() if e["time"] >= since]


def test_register_applies_its_patch_once(stock, monkeypatch):
    monkeypatch.setenv("AFTERBURNER_CONFIG", '{"attention": {"sparse": {"sink_pages": 4}}}')
    since = time.time()
    adapter.register()
    adapter.register()  # SGLang loads plugins more than once per process
    assert adapter.is_active()
    assert patching.applied() == [p.name for p in SGLANG_PATCHES]
    assert ServerArgs.check_server_args.__afterburner_patch__ == "sglang.check_server_args"
    events = _new_events(since)
    assert [e["event"] for e in events] == ["registered", "config"]
    assert events[0]["version"] == "0.5.23" and events[0]["status"] == "tested"
    assert events[1]["where"] == "direct call"
    assert events[1]["config"]["attention"]["sparse"]["sink_pages"] == 4


def test_bad_config_is_recorded_at_register_and_raised_at_the_launch_check(stock, monkeypatch):
    """register() must not raise (SGLang's loader would log and swallow it); the patched
    check_server_args raises, before SGLang's own check runs."""
    monkeypatch.setenv("AFTERBURNER_CONFIG", '{"attention": {"sparse": {"budget_ratio": 2}}}')
    since = time.time()
    adapter.register()
    assert _new_events(since)[-1]["event"] == "config_error"
    with pytest.raises(ConfigError, match=r"afterburner\.attention\.sparse\.budget_ratio"):
        ServerArgs.check_server_args(object())  # the hook raises before the original touches `self`


def _assert_registered_nothing(stock, log_lines, since, reason):
    assert not adapter.is_active()
    assert patching.applied() == [] and ServerArgs.__dict__["check_server_args"] is stock
    events = _new_events(since)
    assert [e["event"] for e in events] == ["skipped"] and reason in events[0]["reason"]
    assert len(log_lines) == 1 and reason in log_lines[0].getMessage()


def test_unsupported_sglang_registers_nothing(stock, monkeypatch, log_lines):
    monkeypatch.setitem(compat.SUPPORTED_RANGES, "sglang", SpecifierSet(">=0.6"))
    since = time.time()
    adapter.register()
    _assert_registered_nothing(stock, log_lines, since, "outside the supported range >=0.6")


def test_moved_target_registers_nothing(stock, monkeypatch, log_lines):
    patch, *others = SGLANG_PATCHES
    moved = patching.Patch(**{**patch.__dict__, "target": "sglang.srt.server_args:ServerArgs.check_args"})
    monkeypatch.setattr(adapter, "SGLANG_PATCHES", (moved, *others))
    since = time.time()
    adapter.register()
    _assert_registered_nothing(stock, log_lines, since, "ServerArgs.check_args is missing")


def test_off_switch_registers_nothing(stock, monkeypatch, log_lines):
    monkeypatch.setenv("AFTERBURNER_DISABLE", "1")
    since = time.time()
    adapter.register()
    _assert_registered_nothing(stock, log_lines, since, "AFTERBURNER_DISABLE")
