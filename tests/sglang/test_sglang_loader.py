"""SGLang's own plugin loader (``sglang.srt.plugins.load_plugins``) finds afterburner's
``sglang.srt.plugins`` entry point and runs it, unless the ``SGLANG_PLUGINS`` allow-list leaves it out.
Fresh processes: ``load_plugins`` runs once per process."""

import os
import subprocess
import sys

import pytest
from engine_setup import AFTERBURNER_CONFIG, AFTERBURNER_SECTION

from afterburner.plugins import report

pytestmark = pytest.mark.sglang

LOAD = "from sglang.srt.plugins import load_plugins; load_plugins()"


def _start_loader(report_dir, allow_list):
    env = {**os.environ, "SGLANG_PLUGINS": allow_list, "AFTERBURNER_CONFIG": AFTERBURNER_CONFIG,
           report.REPORT_DIR_ENV: str(report_dir)}
    return subprocess.Popen([sys.executable, "-c", LOAD], env=env, stderr=subprocess.PIPE, text=True)


def test_loader_runs_register_unless_the_allow_list_leaves_it_out(tmp_path):
    # Both at once: each is ~8 s of importing sglang on one core.
    allowed = _start_loader(tmp_path / "allowed", "afterburner")
    excluded = _start_loader(tmp_path / "excluded", "some_other_plugin")
    for proc in (allowed, excluded):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]

    events = report.read_dir(tmp_path / "allowed")
    assert [e["event"] for e in events] == ["registered", "config"]
    registered, config = events
    assert registered["engine"] == "sglang" and registered["registered"][0] == "sglang.check_server_args"
    assert {"attention backend afterburner-sparse",
            "attention backend afterburner-squeezed"} <= set(registered["registered"])
    assert config["where"] == "<module>"  # load_plugins' caller: the `-c` script
    wanted = AFTERBURNER_SECTION["attention"]["sparse"]
    assert wanted.items() <= config["config"]["attention"]["sparse"].items()
    # Left out of SGLANG_PLUGINS: afterburner's module never ran, so it wrote nothing.
    assert report.read_dir(tmp_path / "excluded") == []
