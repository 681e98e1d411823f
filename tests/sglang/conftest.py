"""SGLang tier: the real sglang modules (sglang venv), on CPU. Skipped where sglang is not installed.

The CUDA-only ``sgl_kernel`` is replaced by a test shim (``shim/``, its functions raise if called) put
first on ``sys.path`` and ``PYTHONPATH`` before anything imports sglang: spawned engine processes and
the subprocesses these tests start inherit both.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_setup import SHIM, cpu_env  # noqa: E402

sys.path.insert(0, str(SHIM))
os.environ.update(cpu_env())
pytest.importorskip("sglang")
