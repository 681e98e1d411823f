"""The distribution builds as a wheel in which each top-level folder is afterburner.<folder>, with both
engines' entry points and the lm-eval task files."""

import subprocess
import sys
import zipfile

import pytest

from support import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("afterburner_llm-*.whl")
    return zipfile.ZipFile(path)


def test_folders_install_under_the_afterburner_namespace(wheel):
    names = set(wheel.namelist())
    for module in ("plugins/config.py", "plugins/vllm/__init__.py", "plugins/sglang/__init__.py",
                   "patches/base.py", "attention_backends/__init__.py", "spec_decode/__init__.py",
                   "samplers/__init__.py"):
        assert f"afterburner/{module}" in names
    assert not any(name.startswith(("plugins/", "tests/", "patches/")) for name in names)


def test_entry_points(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[vllm.general_plugins]\nafterburner = afterburner.plugins.vllm:register" in text
    assert "[sglang.srt.plugins]\nafterburner = afterburner.plugins.sglang:register" in text
    assert "afterburner = afterburner.plugins.cli:main" in text


def test_lm_eval_tasks_are_package_data(wheel):
    tasks = [n for n in wheel.namelist() if n.startswith("afterburner/plugins/lm_eval/tasks/")]
    assert any(n.endswith(".yaml") for n in tasks) and any(n.endswith(".jsonl") for n in tasks)


def test_native_sources_are_package_data(wheel):
    """The C ops are built from their sources at first use: an installed wheel must carry every one."""
    names = set(wheel.namelist())
    sources = sorted(path.relative_to(REPO).as_posix() for path in REPO.glob("attention_backends/**/*.c"))
    assert len(sources) >= 3
    assert [source for source in sources if f"afterburner/{source}" not in names] == []
