"""The patch mechanism: wraps without copying, refuses double patching and moved targets, reverts."""

import sys
import types

import pytest

from afterburner.patches import base as patching
from afterburner.patches.base import Patch, PatchError


@pytest.fixture
def engine_module():
    """A stand-in module for the patch mechanism's own tests (engine patches are tested on vLLM)."""
    module = types.ModuleType("fake_engine_mod")

    class Runner:
        def step(self, x, scale=1):
            return x * scale

    module.Runner = Runner
    sys.modules[module.__name__] = module
    yield module
    patching.revert_all()
    del sys.modules[module.__name__]


def _patch(**overrides):
    fields = dict(name="t.step", target="fake_engine_mod:Runner.step", verified_on=">=1.0,<2", when="after")
    return Patch(**{**fields, **overrides})


def test_after_hook_sees_result_and_args_and_result_is_kept(engine_module):
    seen = []
    patching.apply(_patch(), lambda result, runner, x, **kw: seen.append((result, x, kw)), engine_version="1.2.0")
    assert engine_module.Runner().step(3, scale=2) == 6
    assert seen == [(6, 3, {"scale": 2})]
    assert patching.applied() == ["t.step"]


def test_before_hook_runs_first(engine_module):
    order = []
    original = engine_module.Runner.step
    engine_module.Runner.step = lambda self, x: order.append("original") or x
    engine_module.Runner.step.__name__ = "step"
    patching.apply(_patch(when="before"), lambda runner, x: order.append("hook"), engine_version="1.0")
    engine_module.Runner().step(1)
    assert order == ["hook", "original"]
    patching.revert_all()
    engine_module.Runner.step = original


def test_revert_restores_the_original_object(engine_module):
    original = engine_module.Runner.__dict__["step"]
    patching.apply(_patch(), lambda *a, **k: None, engine_version="1.0")
    assert engine_module.Runner.__dict__["step"] is not original
    patching.revert("t.step")
    assert engine_module.Runner.__dict__["step"] is original and patching.applied() == []


def test_double_patching_is_refused(engine_module):
    patching.apply(_patch(), lambda *a, **k: None, engine_version="1.0")
    with pytest.raises(PatchError, match="applied already"):
        patching.apply(_patch(), lambda *a, **k: None, engine_version="1.0")
    with pytest.raises(PatchError, match="already wrapped by patch t.step"):
        patching.apply(_patch(name="other"), lambda *a, **k: None, engine_version="1.0")


@pytest.mark.parametrize(
    "overrides, version, reason",
    [
        ({"target": "fake_engine_mod:Runner.stepp"}, "1.0", "missing or not callable"),
        ({"target": "fake_engine_mod:Walker.step"}, "1.0", "has no Walker"),
        ({"target": "no_such_engine_mod:Runner.step"}, "1.0", "cannot be imported"),
        ({}, "2.1.0", "verified on >=1.0,<2, not on 2.1.0"),
        ({"expects_params": ("self", "x", "temperature")}, "1.0", r"no longer takes \['temperature'\]"),
    ],
)
def test_moved_or_unverified_targets_fail_loudly_and_touch_nothing(engine_module, overrides, version, reason):
    original = engine_module.Runner.__dict__["step"]
    with pytest.raises(PatchError, match=reason):
        patching.apply(_patch(**overrides), lambda *a, **k: None, engine_version=version)
    assert engine_module.Runner.__dict__["step"] is original and patching.applied() == []


def test_before_async_hook_is_awaited_before_the_original_coroutine(engine_module):
    import asyncio

    order = []

    async def step(self, x):
        order.append("original")
        return x + 1

    async def hook(runner, x):
        await asyncio.sleep(0)
        order.append(("hook", x))

    engine_module.Runner.step = step
    patching.apply(_patch(when="before_async"), hook, engine_version="1.0")
    assert asyncio.run(engine_module.Runner().step(4)) == 5
    assert order == [("hook", 4), "original"]


def test_after_async_hook_sees_the_awaited_result_and_may_change_it_in_place(engine_module):
    import asyncio

    async def step(self, x):
        return {"ids": list(range(x))}

    async def hook(result, runner, x):
        await asyncio.sleep(0)
        result["ids"] = result["ids"][-2:]

    engine_module.Runner.step = step
    patching.apply(_patch(when="after_async"), hook, engine_version="1.0")
    assert asyncio.run(engine_module.Runner().step(5)) == {"ids": [3, 4]}


@pytest.mark.parametrize("when", ["before", "after", "before_async", "after_async"])
def test_a_patch_refuses_a_target_of_the_other_kind(engine_module, when):
    """An async hook on a plain method (or a plain one on a coroutine) would never run or never be awaited."""
    if not when.endswith("_async"):
        async def step(self, x):
            return x

        engine_module.Runner.step = step
    with pytest.raises(PatchError, match="coroutine function"):
        patching.apply(_patch(when=when), lambda *a, **k: None, engine_version="1.0")
    assert patching.applied() == []
