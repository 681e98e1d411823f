"""The vLLM adapter's guard with the real vllm modules imported (no engine): when afterburner must not run
(unsupported version, a patch target that moved, the off switch) vLLM's methods stay the originals."""

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.worker.worker_base import WorkerWrapperBase  # noqa: E402

from afterburner.patches import VLLM_PATCHES  # noqa: E402
from afterburner.patches import base as patching
from afterburner.plugins import compat, report  # noqa: E402
from afterburner.plugins.guard import guarded_register  # noqa: E402
from afterburner.plugins.vllm import hooks  # noqa: E402


@pytest.fixture
def originals(monkeypatch):
    """This process as if afterburner had never registered here (the session engine of conftest.py, in this
    process, may have): vLLM's original methods and an empty patch table; both come back afterwards."""
    for entry in list(patching._applied.values()):
        monkeypatch.setattr(entry.owner, entry.attr, entry.original)
    monkeypatch.setattr(patching, "_applied", {})
    saved = (EngineArgs.__dict__["create_engine_config"], WorkerWrapperBase.__dict__["init_device"])
    yield saved
    patching.revert_all()
    assert (EngineArgs.__dict__["create_engine_config"], WorkerWrapperBase.__dict__["init_device"]) == saved


def _stock(originals):
    return (EngineArgs.__dict__["create_engine_config"], WorkerWrapperBase.__dict__["init_device"]) == originals


def test_supported_version_applies_every_patch(originals):
    assert guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS)
    assert patching.applied() == [p.name for p in VLLM_PATCHES]
    assert not _stock(originals)
    assert report.events()[-1]["event"] == "registered"


def test_a_release_beyond_a_features_verified_range_registers_the_rest(originals, monkeypatch):
    """vLLM 0.33 is in the supported range but the tree-speculation patches are verified on 0.32 only (0.33
    has no Medusa): they stay off with one line, the other patches apply."""
    monkeypatch.setattr(compat, "installed_version", lambda engine: "0.33.0")
    assert guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS)
    tree = [p.name for p in VLLM_PATCHES if p.verified_on == ">=0.32.0,<0.33"]
    assert tree and patching.applied() == [p.name for p in VLLM_PATCHES if p.name not in tree]
    skipped = [e for e in report.events() if e["event"] == "patches_skipped"][-1]
    assert skipped["patches"] == tree and not _stock(originals)


def test_unsupported_version_registers_nothing(originals, monkeypatch, caplog):
    monkeypatch.setitem(compat.SUPPORTED_RANGES, "vllm", compat.SpecifierSet(">=0.40"))
    assert not guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS)
    assert patching.applied() == [] and _stock(originals)
    last = report.events()[-1]
    assert last["event"] == "skipped" and "outside the supported range >=0.40" in last["reason"]


def test_moved_target_reverts_everything(originals, monkeypatch):
    target = "vllm.v1.worker.worker_base:WorkerWrapperBase.init_devices"
    moved = VLLM_PATCHES[-1].__class__(**{**VLLM_PATCHES[-1].__dict__, "target": target})
    hooks_with_moved = {**hooks.HOOKS, moved.name: hooks.on_worker_device}
    assert not guarded_register("vllm", (*VLLM_PATCHES[:-1], moved), hooks_with_moved)
    assert patching.applied() == [] and _stock(originals)
    assert "init_devices is missing" in report.events()[-1]["reason"]


def test_off_switch(originals, monkeypatch):
    monkeypatch.setenv("AFTERBURNER_DISABLE", "1")
    assert not guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS)
    assert patching.applied() == [] and _stock(originals)
