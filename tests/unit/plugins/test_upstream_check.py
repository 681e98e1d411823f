"""The upstream check reads an engine wheel's source: a patch target that moved or lost a parameter, and
an adapter import that is gone, are named; present ones pass."""

import zipfile

from afterburner.patches.vllm_engine_config import ENGINE_CONFIG
from afterburner.patches.vllm_worker_init_device import WORKER_INIT_DEVICE
from afterburner.plugins.devtools.upstream_check import WheelSource, adapter_imports, check_import, check_patch


def _wheel(tmp_path, files: dict[str, str]):
    path = tmp_path / "engine-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return WheelSource(path)


def test_patch_targets_and_imports_are_found_or_named(tmp_path):
    source = _wheel(tmp_path, {
        "vllm/__init__.py": "from vllm.sampling import SamplingParams\n",
        "vllm/engine/arg_utils.py": "class EngineArgs:\n    def create_engine_config(self, usage=None): ...\n",
        "vllm/v1/worker/worker_base.py": "class WorkerWrapperBase:\n    def init_devices(self): ...\n",
        "vllm/config/__init__.py": "if True:\n    def get_current_vllm_config(): ...\n",
    })
    assert check_patch(source, ENGINE_CONFIG) is None
    assert "init_device is not defined there" in check_patch(source, WORKER_INIT_DEVICE)
    assert check_import(source, "vllm", "SamplingParams") is None
    assert check_import(source, "vllm.config", "get_current_vllm_config") is None
    assert check_import(source, "vllm.config", "VllmConfig") == "vllm.config no longer defines VllmConfig"
    assert check_import(source, "vllm.v1.spec_decode.medusa", "MedusaProposer") == \
        "module vllm.v1.spec_decode.medusa is gone"


def test_the_adapters_imports_are_collected_and_feature_files_can_be_left_out():
    every = adapter_imports("vllm")
    assert ("vllm.v1.attention.backends.registry", "register_backend") in every
    assert ("vllm.v1.spec_decode.medusa", "MedusaProposer") in every
    assert ("vllm.v1.spec_decode.medusa", "MedusaProposer") not in adapter_imports(
        "vllm", frozenset({"medusa_proposer.py"}))
