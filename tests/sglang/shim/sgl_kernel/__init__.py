"""Test-only stand-in for ``sgl_kernel``, SGLang's CUDA-only kernel package (no CPU wheel exists; the real
one fails to import here: ``libcuda.so.1`` missing). SGLang imports it at module level even on the CPU
path, but on a CPU without AMX it calls none of its functions (README, Engine notes), except the CPU-build ops
its speculative path calls, which the shim has in torch (``cpu_spec_ops``). Every other name, and every
``sgl_kernel.<submodule>``, imports fine and raises if called: a call means the CPU path changed.

Put ``tests/sglang/shim`` first on ``sys.path`` / ``PYTHONPATH`` (tests/sglang/conftest.py does).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class ShimCalled(RuntimeError):
    """sglang called a CUDA kernel that the CPU test shim does not have."""


class _Missing:
    """A kernel (or a namespace of kernels) that raises when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ShimCalled(f"{self._name} is a CUDA kernel; the sgl_kernel test shim has none (CPU path moved)")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<sgl_kernel shim {self._name}>"


def _missing_attr(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{module_name}.{attr}")

    return __getattr__


class _ShimSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any ``sgl_kernel.x.y`` as an empty package whose names are ``_Missing``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _missing_attr(spec.name)
        return module

    def exec_module(self, module):
        pass


from sgl_kernel.cpu_spec_ops import (  # noqa: E402,F401  torch versions of the CPU build's speculative ops
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    verify_tree_greedy_cpu,
)

__getattr__ = _missing_attr(__name__)
sys.meta_path.insert(0, _ShimSubmodules())
