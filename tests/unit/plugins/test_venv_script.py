"""scripts/venv.sh: a failed build is never marked complete, a broken venv is rebuilt, builds do not race.

The script runs for real against a stand-in interpreter whose `-m venv` makes a venv with a scripted pip,
so these checks need no network and take a second.
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

FAKE_PYTHON = """#!/usr/bin/env bash
# `-m venv DIR` makes a venv of stand-ins: this interpreter and a pip that fails `install -r` on FAIL_PIP.
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  echo build >> "$BUILD_LOG"
  cp "$0" "$3/bin/python"
  pip='sleep "${PIP_SLEEP:-0}"; [ "$2" = -r ] && [ -n "$FAIL_PIP" ] && exit 1; exit 0'
  printf '#!/usr/bin/env bash\\n%s\\n' "$pip" > "$3/bin/pip"
  chmod +x "$3/bin/pip"
fi
exit 0
"""


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "requirements").mkdir()
    shutil.copy(ROOT / "scripts" / "venv.sh", repo / "scripts" / "venv.sh")
    (repo / "requirements" / "sglang.txt").write_text("some-pin==1\n")
    (repo / "requirements" / "models.txt").write_text("some-model==1\n")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return repo


def _run(tmp_path: Path, repo: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, AFTERBURNER_CACHE=str(tmp_path / "cache"), PYTHON=str(tmp_path / "python"),
                BUILD_LOG=str(tmp_path / "builds"), **env)
    return subprocess.run(["bash", str(repo / "scripts" / "venv.sh"), "sglang"], env=full,
                          capture_output=True, text=True, timeout=60)


def _builds(tmp_path: Path) -> int:
    log = tmp_path / "builds"
    return len(log.read_text().split()) if log.exists() else 0


def test_a_failed_install_fails_the_script_and_leaves_no_complete_venv(tmp_path):
    repo = _repo(tmp_path)
    done = _run(tmp_path, repo, FAIL_PIP="1")
    assert done.returncode != 0
    assert "building the sglang venv failed" in done.stderr
    assert not list((tmp_path / "cache" / "venvs").glob("*/.complete"))
    # The next call builds again rather than trusting the failed folder.
    again = _run(tmp_path, repo)
    assert again.returncode == 0, again.stderr
    venv = Path(again.stdout.strip())
    assert (venv / ".complete").exists() and _builds(tmp_path) == 2


def test_a_complete_mark_without_an_interpreter_is_rebuilt(tmp_path):
    repo = _repo(tmp_path)
    venv = Path(_run(tmp_path, repo).stdout.strip())
    (venv / "bin" / "python").unlink()  # what an interrupted build that deleted the folder left behind
    done = _run(tmp_path, repo)
    assert done.returncode == 0, done.stderr
    assert (venv / "bin" / "python").exists() and _builds(tmp_path) == 2
    # A sound venv is reused: no third build.
    assert _run(tmp_path, repo).returncode == 0 and _builds(tmp_path) == 2


def test_two_callers_at_once_build_once(tmp_path):
    repo = _repo(tmp_path)
    results = []
    callers = [threading.Thread(target=lambda: results.append(_run(tmp_path, repo, PIP_SLEEP="0.5")))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert [r.returncode for r in results] == [0, 0]
    assert _builds(tmp_path) == 1
