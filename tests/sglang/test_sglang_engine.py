"""A real ``sglang.Engine`` on CPU in this process, with afterburner loaded by SGLang's plugin loader:
register runs in each engine process and sees AFTERBURNER_CONFIG there, greedy output is deterministic
and identical with afterburner disabled, and a bad config stops startup with one message naming the
field, before any engine subprocess starts."""

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from engine_setup import (
    AFTERBURNER_CONFIG,
    AFTERBURNER_SECTION,
    ENGINE_KWARGS,
    MAX_NEW_TOKENS,
    cli_flags,
    greedy_ids,
)

from afterburner.plugins import report
from afterburner.plugins.config import ConfigError
from support.worker import run_worker_or_fail

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

SCRIPTS = Path(__file__).parent / "scripts"


def test_register_ran_in_every_engine_process_with_the_config(engine):
    _, report_dir = engine
    events = report.read_dir(report_dir)
    configs = {e["where"]: e for e in events if e["event"] == "config"}
    # Each engine subprocess ran register via load_plugins; this process checked the config at launch.
    assert {"run_scheduler_process", "run_detokenizer_process", "check_server_args"} <= set(configs)
    assert configs["check_server_args"]["pid"] == os.getpid()
    children = {configs[w]["pid"] for w in ("run_scheduler_process", "run_detokenizer_process")}
    assert len(children) == 2 and os.getpid() not in children
    for pid in children:  # first; later events (AWRS requests in the scheduler) depend on the tests run
        assert [e["event"] for e in events if e["pid"] == pid][:2] == ["registered", "config"]
    wanted = AFTERBURNER_SECTION["attention"]["sparse"]
    for event in configs.values():
        assert wanted.items() <= event["config"]["attention"]["sparse"].items(), event["where"]


def test_greedy_generation_is_deterministic(engine):
    first, second = greedy_ids(engine[0]), greedy_ids(engine[0])
    assert first == second
    assert [len(ids) for ids in first] == [MAX_NEW_TOKENS] * len(first)


def test_disabled_afterburner_gives_identical_output(engine, tiny_model, tmp_path):
    ours = greedy_ids(engine[0])
    report_dir = tmp_path / "report"
    env = {"AFTERBURNER_DISABLE": "1", "AFTERBURNER_CONFIG": AFTERBURNER_CONFIG, report.REPORT_DIR_ENV: str(report_dir)}
    disabled, _ = run_worker_or_fail(SCRIPTS / "run_engine.py", tiny_model, env=env, timeout=300)
    assert disabled == ours
    # The off switch reached every engine process (main, scheduler, detokenizer) and nothing registered.
    events = report.read_dir(report_dir)
    assert {e["event"] for e in events} == {"skipped"} and len({e["pid"] for e in events}) == 3


@pytest.mark.parametrize(
    "config, field",
    [
        ('{"attention": {"method": "quest"}}', r"afterburner\.attention\.method: Input should be 'dense'"),
        ('{"attention": {"sparse": {"budget_ratio": 3}}}', r"afterburner\.attention\.sparse\.budget_ratio"),
        ('{"afterburner": {"turbo": 1}}',
         r"afterburner\.turbo: unknown key; allowed keys here: attention, enabled"),
        ("/no/such/afterburner.yaml", r"names a file that does not exist: /no/such/afterburner\.yaml"),
        ('{"speculative": {"min_drafts": 1}}', r"afterburner\.speculative\.min_drafts: vLLM's micro-step drafter only"),
        ('{"speculative": {"stop_head": true}}',
         r"afterburner\.speculative\.stop_head: a stop head on vLLM's EAGLE-3 only"),
    ],
)
def test_bad_config_stops_engine_before_any_subprocess(engine, tiny_model, monkeypatch, config, field):
    """``engine`` guarantees SGLang's loader has run register in this process."""
    import sglang

    monkeypatch.setenv("AFTERBURNER_CONFIG", config)
    children = set(multiprocessing.active_children())
    with pytest.raises(ConfigError, match=field):
        sglang.Engine(model_path=str(tiny_model), **ENGINE_KWARGS)
    assert set(multiprocessing.active_children()) == children


def test_bad_config_stops_launch_server_with_one_line(tiny_model, tmp_path):
    """The server CLI, in a fresh process: exit 1, one line naming the field, no traceback, and no
    engine subprocess ever ran register."""
    env = {**os.environ, "AFTERBURNER_CONFIG": '{"attention": {"sparse": {"recent_pages": -1}}}',
           report.REPORT_DIR_ENV: str(tmp_path)}
    with socket.socket() as probe:  # a free port, in case the server got as far as binding one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "sglang.launch_server", f"--model-path={tiny_model}", f"--port={port}"]
    run = subprocess.run([*command, *cli_flags()], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 1
    ours = [line for line in run.stderr.splitlines() if "afterburner config" in line]
    expected = (
        "ERROR [afterburner] invalid afterburner config from AFTERBURNER_CONFIG (JSON text): "
        "afterburner.attention.sparse.recent_pages: Input should be greater than or equal to 0 (got -1)"
    )
    assert ours == [expected], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    # Only the launching process ran register (and noted the bad config): nothing was spawned.
    assert [e["event"] for e in report.read_dir(tmp_path)] == ["registered", "config_error"]
