"""SMC over a running `vllm serve` (``plugins/server_smc.py``), on a composed server: SmolLM2 with a draft
model drafting token trees (afterburner's ``speculative.tree``). The particles' chunks are the server's
seeded samples (the same seed gives the same chunk), the filter runs to the end with the speculative
server verifying drafts for it, every particle that keeps weight satisfies the constraint and ended, and
`afterburner smc --server` prints the same filter's result as one JSON object."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import regex
from transformers import AutoTokenizer

from afterburner.plugins.devtools.vllm_server import spec_steps, vllm_server
from afterburner.plugins.server_smc import ServerError, served_model, server_extend, server_smc
from afterburner.spec_decode.draft.derive import cached_layer_draft

PROMPT = "<|im_start|>user\nIs the sky blue? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n"
ANSWER = r"(Yes|No|yes|no)[.,!]?( [A-Za-z ,.']*)?"
SMC = {"n_particles": 8, "max_tokens": 24, "chunk_tokens": 6, "seed": 0}


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    spec = {"method": "draft_model", "model": str(cached_layer_draft(smollm2, 25)), "num_speculative_tokens": 4}
    section = {"afterburner": {"speculative": {"tree": "paper"}}}
    with vllm_server(smollm2, "--speculative-config", json.dumps(spec), "--additional-config", json.dumps(section),
                     log=tmp_path_factory.mktemp("serve") / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def url(served):
    return f"http://127.0.0.1:{served.port}"


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def test_chunks_are_the_servers_seeded_samples(url, tokenizer):
    ids = tokenizer.encode(PROMPT)
    make = lambda seed: server_extend(url, served_model(url), ids, tokenizer.eos_token_id, seed=seed)  # noqa: E731
    prefixes = [[], tokenizer.encode("Yes", add_special_tokens=False)]
    first, again, other = make(5)(prefixes, 6), make(5)(prefixes, 6), make(6)(prefixes, 6)
    assert first == again, "the same seed must give the same chunks"
    assert first != other, "another seed should give other chunks at temperature 1"
    for chunk in first:
        assert 1 <= len(chunk) <= 6 and all(isinstance(t, int) for t in chunk)
        assert tokenizer.eos_token_id not in chunk[:-1]


def test_smc_runs_over_a_speculative_server_and_keeps_only_valid_particles(served, url, tokenizer):
    before = served.spec_counters()
    samples, result = server_smc(url, PROMPT, {"regex": ANSWER}, tokenizer=tokenizer, progress=False, **SMC)
    assert spec_steps(before, served.spec_counters())["verification_steps"] > 0, "the server verified no drafts"
    kept = [s for s in samples if s.weight > 0]
    assert kept, f"every particle died: {[s.text for s in samples]}"
    assert math.isfinite(result.log_normalizer) and abs(sum(s.weight for s in samples) - 1) < 1e-9
    for sample in kept:
        assert regex.fullmatch(ANSWER, sample.text), sample.text
    assert result.checks > 0


def test_the_cli_prints_the_same_filter(url, smollm2, tokenizer):
    _, expected = server_smc(url, PROMPT, {"regex": ANSWER}, tokenizer=tokenizer, progress=False, **SMC)
    out = subprocess.run(
        [str(Path(sys.executable).with_name("afterburner")), "smc", "--server", url, "--model", str(smollm2),
         "--prompt", PROMPT, "--regex", ANSWER, "--particles", "8", "--max-tokens", "24", "--chunk-tokens", "6",
         "--seed", "0", "--json"], capture_output=True, text=True, timeout=600, check=True)
    printed = json.loads(out.stdout)
    assert printed["log_normalizer"] == pytest.approx(expected.log_normalizer)
    assert printed["resamples"] == expected.resamples and printed["checks"] == expected.checks


def test_a_server_that_is_not_there_is_one_error_line(tokenizer):
    with pytest.raises(ServerError, match="did not answer"):
        server_smc("http://127.0.0.1:9", PROMPT, None, tokenizer=tokenizer, progress=False, **SMC)
