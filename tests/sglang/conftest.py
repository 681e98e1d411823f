"""SGLang tier: the real sglang modules (sglang venv), on CPU. Skipped where sglang is not installed.

The CUDA-only ``sgl_kernel`` is replaced by a test shim (``shim/``: torch versions of the CPU-build ops
SGLang's speculative path calls; any other function raises if called) put
first on ``sys.path`` and ``PYTHONPATH`` before anything imports sglang: spawned engine processes and
the subprocesses these tests start inherit both.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_setup import AFTERBURNER_CONFIG, ENGINE_KWARGS, SHIM, cpu_env  # noqa: E402

from afterburner.plugins import report  # noqa: E402

sys.path.insert(0, str(SHIM))
os.environ.update(cpu_env())
pytest.importorskip("sglang")


@pytest.fixture(scope="session")
def engine(tiny_model, tmp_path_factory):
    """One Engine for the session (~50-60 s to start on 2 cores: the scheduler and detokenizer each
    import sglang). The report dir and config are set only while it starts: its subprocesses inherit
    them, and later tests in this process do not write there. The tiny model is its own SpecPC draft
    (requests that do not ask for SpecPC never load it)."""
    import json

    import sglang

    report_dir = tmp_path_factory.mktemp("report")
    config = json.loads(AFTERBURNER_CONFIG)
    config["afterburner"]["specpc"] = {"draft": str(tiny_model), "window": 16, "kernel": 8, "neighbours": 4}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(report.REPORT_DIR_ENV, str(report_dir))
        env.setenv("AFTERBURNER_CONFIG", json.dumps(config))
        env.delenv("AFTERBURNER_DISABLE", raising=False)
        started = sglang.Engine(model_path=str(tiny_model), **ENGINE_KWARGS)
    yield started, report_dir
    started.shutdown()
