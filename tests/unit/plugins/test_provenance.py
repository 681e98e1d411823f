"""Results JSON files record the git commit and whether the tree was dirty, and a dirty tree does not
overwrite a committed result unless told to (plugins/devtools/provenance.py), in a throwaway repository."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from afterburner.plugins.devtools.provenance import ALLOW_DIRTY_ENV, COMMIT_ENV, DirtyTreeError, git_info, write_result

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")

RESULT = "benchmarks/results/bench.json"
COMMITTED = '{"results": {"ms": 1.0}}\n'


def _git(repo, *args):
    config = ["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    done = subprocess.run(["git", *config, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_DIRTY_ENV, raising=False)
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "bench.py").write_text("print('measure')\n")
    (root / ".gitignore").write_text("*.log\n")
    (root / RESULT).write_text(COMMITTED)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "code and a result")
    return root


def _write(repo, path=RESULT, **kwargs):
    return write_result(repo / path, {"ms": 2.0}, command="python bench.py", repo=repo, **kwargs)


def test_clean_tree_records_the_commit(repo):
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40
    assert git_info(repo) == {"commit": sha, "dirty": False}
    written = json.loads(_write(repo).read_text())  # clean: overwriting a committed result is fine
    assert written["git"] == {"commit": sha, "dirty": False}
    assert written["results"] == {"ms": 2.0} and written["command"] == "python bench.py"
    assert {"date", "machine", "versions"} <= set(written)


def test_changes_make_the_tree_dirty(repo):
    (repo / "bench.py").write_text("print('measure faster')\n")
    info = git_info(repo)
    assert info["dirty"] is True and info["commit"] == _git(repo, "rev-parse", "HEAD")
    assert any("bench.py" in line for line in info["changes"])


def test_untracked_files_count_unless_ignored(repo):
    (repo / "run.log").write_text("ignored\n")
    assert git_info(repo)["dirty"] is False
    (repo / "helper.py").write_text("x = 1\n")
    assert git_info(repo)["dirty"] is True


def test_results_are_outputs_not_code(repo):
    (repo / RESULT).write_text('{"results": {"ms": 3.0}}\n')
    (repo / "benchmarks" / "results" / "other.json").write_text("{}\n")
    assert git_info(repo)["dirty"] is False
    assert json.loads(_write(repo).read_text())["git"]["dirty"] is False


def test_dirty_tree_refuses_to_overwrite_a_committed_result(repo):
    (repo / "bench.py").write_text("print('measure faster')\n")
    with pytest.raises(DirtyTreeError, match=r"refusing to overwrite .*bench\.json.*--allow-dirty.*numbers are "
                                             r"kept in .*bench\.unsaved-\d{8}T\d{6}\.json"):
        _write(repo)
    assert (repo / RESULT).read_text() == COMMITTED
    kept = json.loads(next((repo / RESULT).parent.glob("bench.unsaved-*.json")).read_text())  # not lost
    assert kept["results"] == {"ms": 2.0} and kept["git"]["dirty"] is True

    written = json.loads(_write(repo, allow_dirty=True).read_text())
    assert written["results"] == {"ms": 2.0}
    assert written["git"]["dirty"] is True and written["git"]["commit"] == _git(repo, "rev-parse", "HEAD")


def test_environment_variable_allows_a_dirty_overwrite(repo, monkeypatch):
    (repo / "bench.py").write_text("print('measure faster')\n")
    monkeypatch.setenv(ALLOW_DIRTY_ENV, "1")
    assert json.loads(_write(repo).read_text())["git"]["dirty"] is True


def test_new_result_can_be_written_from_a_dirty_tree(repo):
    (repo / "bench.py").write_text("print('measure faster')\n")
    written = json.loads(_write(repo, "benchmarks/results/new.json").read_text())
    assert written["git"]["dirty"] is True and written["results"] == {"ms": 2.0}
    assert (repo / RESULT).read_text() == COMMITTED


def test_outside_a_repository_git_is_null(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_DIRTY_ENV, raising=False)
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # even if tmp_path lies inside a repository
    plain = tmp_path / "plain"
    plain.mkdir()
    info = git_info(plain)
    assert info["commit"] is None and info["dirty"] is None and "not in a git work tree" in info["error"]
    written = json.loads(write_result(plain / "r.json", {"ms": 2.0}, command="c", repo=plain).read_text())
    assert written["git"]["commit"] is None and written["git"]["dirty"] is None


def test_without_git_the_block_says_so(repo, monkeypatch):
    monkeypatch.setenv("PATH", str(repo / "no-such-bin"))
    info = git_info(repo)
    assert info["commit"] is None and info["dirty"] is None and "git is not installed" in info["error"]


def test_a_copy_records_the_commit_it_is_given(tmp_path, monkeypatch):
    """The GPU machine gets a copy of the tree: the run names its commit, and the block says so."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    plain = tmp_path / "plain"
    plain.mkdir()
    info = git_info(plain)
    assert info["commit"] == "abc123" and info["dirty"] is None and info["given_by"] == COMMIT_ENV
    assert "not in a git work tree" in info["git_here"]["error"]


def test_a_given_commit_wins_over_a_stale_git_copy(repo, monkeypatch):
    seen = git_info(repo)["commit"]
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    info = git_info(repo)
    assert info["commit"] == "abc123" and info["git_here"]["commit"] == seen


def test_a_given_commit_does_not_lift_the_dirty_guard(repo, monkeypatch):
    monkeypatch.delenv(ALLOW_DIRTY_ENV, raising=False)
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    (repo / "code.py").write_text("changed = True\n")
    with pytest.raises(DirtyTreeError):
        write_result(repo / RESULT, {"ms": 1.0}, command="c", repo=repo)


def test_every_committed_result_names_the_commit_it_was_measured_on():
    results = sorted((Path(__file__).parents[3] / "benchmarks" / "results").glob("*.json"))
    assert len(results) > 50
    missing = [path.name for path in results
               if not re.fullmatch(r"[0-9a-f]{40}", str((json.loads(path.read_text()).get("git") or {}).get("commit")))]
    assert not missing, f"results without their commit: {missing}"
