"""Medusa checkpoints: our (vLLM) format round-trips, FasterDecoding folders built by hand load with the
right math, and every bad folder fails with one clear line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from afterburner.spec_decode.medusa.checkpoint import (
    CheckpointError,
    load_heads,
    load_shared_lm_head,
    save_heads,
)
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads

H, V = 16, 40


def _random_heads(**kwargs) -> MedusaHeads:
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(hidden_size=H, vocab_size=V, **kwargs))
    with torch.no_grad():
        for p in heads.parameters():  # the blocks start at zero: give them values a round trip can lose
            p.copy_(torch.randn_like(p) * 0.1)
    return heads


@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_in_vllm_format(tmp_path, shared):
    heads = _random_heads(num_heads=3, num_layers=2, shared_lm_head=shared)
    lm_head = torch.randn(V, H)
    out = save_heads(heads, tmp_path / "heads", base_model="/models/base", lm_head_weight=lm_head,
                     provenance={"steps": 7})
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_heads", "num_hidden_layers", "hidden_size", "vocab_size",
                                   "medusa_fc_bias", "original_lm_head")} == {
        "model_type": "medusa", "num_heads": 3, "num_hidden_layers": 2, "hidden_size": H, "vocab_size": V,
        "medusa_fc_bias": True, "original_lm_head": shared}
    assert config["afterburner"]["shared_lm_head"] is shared
    assert config["afterburner"]["base_model"] == "/models/base"
    assert config["afterburner"]["training"] == {"steps": 7}
    names = set(load_file(out / "model.safetensors"))
    blocks = {f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    assert names == blocks | ({"lm_heads.0.weight"} if shared else {f"lm_heads.{i}.weight" for i in range(3)})
    assert not (tmp_path / "heads.partial").exists()

    loaded = load_heads(out)
    assert loaded.config == heads.config
    x = torch.randn(5, H)
    torch.testing.assert_close(loaded(x, lm_head), heads(x, lm_head), rtol=0, atol=0)
    if shared:
        torch.testing.assert_close(load_shared_lm_head(out), lm_head, rtol=0, atol=0)
    else:
        assert load_shared_lm_head(out) is None
    assert next(load_heads(out, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_saving_again_replaces_the_folder(tmp_path):
    save_heads(_random_heads(num_heads=2), tmp_path / "h")
    (tmp_path / "h" / "stale.txt").write_text("old")
    save_heads(_random_heads(num_heads=1), tmp_path / "h")
    assert not (tmp_path / "h" / "stale.txt").exists()
    assert load_heads(tmp_path / "h").config.num_heads == 1


def _fasterdecoding_folder(folder, *, num_heads=2, num_layers=2, suffix="pt"):
    """Their layout: per head nn.Sequential(ResBlock x num_layers, Linear(H, V, bias=False))."""
    torch.manual_seed(1)
    state = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            state[f"{head}.{layer}.linear.weight"] = torch.randn(H, H) * 0.1
            state[f"{head}.{layer}.linear.bias"] = torch.randn(H) * 0.1
        state[f"{head}.{num_layers}.weight"] = torch.randn(V, H)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": "lmsys/x"}))
    if suffix == "pt":
        torch.save(state, folder / "medusa_lm_head.pt")
    else:
        save_file(state, str(folder / "medusa_lm_head.safetensors"))
    return state


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_fasterdecoding_checkpoint_loads_with_their_math(tmp_path, suffix):
    state = _fasterdecoding_folder(tmp_path / "fd", suffix=suffix)
    heads = load_heads(tmp_path / "fd")
    assert heads.config == HeadsConfig(hidden_size=H, vocab_size=V, num_heads=2, num_layers=2,
                                       shared_lm_head=False, bias=True)
    x = torch.randn(4, H)
    expected = []
    for head in range(2):
        h = x
        for layer in range(2):
            h = h + torch.nn.functional.silu(h @ state[f"{head}.{layer}.linear.weight"].T
                                             + state[f"{head}.{layer}.linear.bias"])
        expected.append(h @ state[f"{head}.2.weight"].T)
    torch.testing.assert_close(heads(x), torch.stack(expected))
    # and it converts: saved in our format, it loads back the same
    torch.testing.assert_close(load_heads(save_heads(heads, tmp_path / "ours"))(x), heads(x), rtol=0, atol=0)


def _expect_error(folder, fragment):
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_heads(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_name_the_problem(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    _expect_error(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "has no config.json")

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    message = _expect_error(tmp_path / "llama", "not a Medusa checkpoint")
    assert "medusa_num_heads" in message and "num_heads" in message and "'hidden_size'" in message

    _fasterdecoding_folder(tmp_path / "fd")
    (tmp_path / "fd" / "medusa_lm_head.pt").unlink()
    _expect_error(tmp_path / "fd", "medusa_lm_head.safetensors or medusa_lm_head.pt")

    out = save_heads(_random_heads(num_heads=2), tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_size": H + 1}))
    _expect_error(out, r"shape mismatch for blocks\.0\.layers\.0\.weight")
    (out / "config.json").write_text(json.dumps({**config, "num_heads": 3}))
    _expect_error(out, r"missing \['blocks\.2")
    (out / "model.safetensors").unlink()
    _expect_error(out, "no weights file: expected model.safetensors")


def test_shared_heads_need_the_base_lm_head_to_save(tmp_path):
    heads = _random_heads(num_heads=2, shared_lm_head=True)
    with pytest.raises(CheckpointError, match="pass lm_head_weight"):
        save_heads(heads, tmp_path / "h")
    with pytest.raises(CheckpointError, match="expected"):
        save_heads(heads, tmp_path / "h", lm_head_weight=torch.zeros(V, H + 1))
