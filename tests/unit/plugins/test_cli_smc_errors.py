"""`afterburner smc` with bad arguments (issue #12, item 4): one ``error:`` line and exit status 2 before
any engine starts (these run without vLLM's engine: a model folder that does not exist is never read)."""

import pytest

from afterburner.plugins.cli import main


@pytest.mark.parametrize("extra, message", [
    (["--particles", "0"], "error: SMC needs n_particles >= 1 (an integer), got 0"),
    (["--particles", "-5"], "error: SMC needs n_particles >= 1 (an integer), got -5"),
    (["--max-tokens", "0"], "error: SMC needs max_tokens >= 1 (an integer), got 0"),
    (["--ess-threshold", "2"], "error: SMC needs 0 <= ess_threshold <= 1, got 2.0"),
    (["--regex", "(x"], "unclosed group"),
])
def test_bad_smc_arguments_are_one_line_before_the_engine(tmp_path, capsys, extra, message):
    argv = ["smc", "--model", str(tmp_path / "no-model"), "--prompt", "Hi", *extra]
    if "--regex" not in extra:
        argv += ["--regex", "[0-9]+"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "\n" not in err
