"""``afterburner train lla`` end to end at toy size: both folders, the lambda key, eval.json, --resume and
--eval-only. (Lives here, not in tests/unit/plugins, beside the code it drives.)"""

import json

from afterburner.attention_backends.local_linear.model import ARCHITECTURE, LAMBDA_KEY
from afterburner.plugins.cli import main

TOY = ["--steps", "3", "--batch-size", "2", "--hidden", "16", "--heads", "2", "--kv-heads", "1",
       "--intermediate", "16", "--layers", "2", "--eval-instances", "2", "--save-every", "2", "--threads", "1"]


def test_train_lla_writes_both_folders_and_the_evaluation(tmp_path, capsys):
    assert main(["train", "lla", "--out", str(tmp_path), *TOY]) == 0
    for name in ("softmax", "local_linear"):
        folder = tmp_path / name
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        assert (tmp_path / f"{name}.train" / "checkpoint.pt").is_file()
    config = json.loads((tmp_path / "local_linear" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and len(config[LAMBDA_KEY]) == 2
    assert config["model_type"] == "llama"  # transformers still loads it as a Llama
    softmax_config = json.loads((tmp_path / "softmax" / "config.json").read_text())
    assert LAMBDA_KEY not in softmax_config and softmax_config["architectures"] == ["LlamaForCausalLM"]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["train"]["local_linear"]["steps"] == 3
    assert 0 <= report["eval"]["local_linear"]["mqar"][0]["accuracy"] <= 1
    assert "MQAR accuracy" in capsys.readouterr().out

    assert main(["train", "lla", "--out", str(tmp_path), *TOY, "--resume", "--attention", "local_linear"]) == 0
    resumed = json.loads((tmp_path / "eval.json").read_text())
    assert resumed["train"]["local_linear"]["resumed_from"] == 3
    assert resumed["eval"]["local_linear"]["mqar"] == report["eval"]["local_linear"]["mqar"]

    assert main(["train", "lla", "--out", str(tmp_path), "--eval-only", "--eval-instances", "2"]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["eval"]["local_linear"]["mqar"] == report["eval"]["local_linear"]["mqar"]
