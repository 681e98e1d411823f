"""Drafter folders round-trip (weights only, no base embedding or LM head), bad folders give one line, and
the base's embedding and LM head come from its safetensors (tied or not)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from afterburner.spec_decode.hamburger.checkpoint import (
    CheckpointError,
    load_base_embeddings,
    load_drafter,
    read_config,
    save_drafter,
)
from afterburner.spec_decode.medusa.distill_data import load_base
from support.hamburger import random_drafter, small_config


def test_round_trip(tmp_path):
    drafter = random_drafter(small_config())
    folder = save_drafter(tmp_path / "d", drafter, provenance={"steps": 3})
    config = json.loads((folder / "config.json").read_text())
    assert config["afterburner_drafter"] == "hamburger" and config["training"] == {"steps": 3}
    stored = load_file(str(folder / "model.safetensors"))
    assert set(stored) == set(drafter.state_dict()) and not {"embed_weight", "lm_head_weight"} & set(stored)
    loaded = load_drafter(folder)
    assert loaded.config == drafter.config and loaded.embed_weight is None and not loaded.training
    assert read_config(folder) == (drafter.config, {"steps": 3})
    loaded.attach_base(drafter.embed_weight, drafter.lm_head_weight)
    features, tokens = torch.randn(2, 2, 32), torch.randint(0, 50, (2, 3))
    for a, b in zip(drafter(features, tokens), loaded(features, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert next(load_drafter(folder, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    save_drafter(folder, random_drafter(small_config(), seed=1))  # replaces the folder whole
    assert not torch.equal(load_drafter(folder).fc_in.weight, drafter.fc_in.weight)


def test_bad_folders_are_one_line(tmp_path):
    def error(folder) -> str:
        with pytest.raises(CheckpointError) as info:
            load_drafter(folder)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "missing")
    assert "has no config.json" in error(tmp_path)
    folder = save_drafter(tmp_path / "d", random_drafter(small_config()))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "afterburner_drafter": "medusa"}))
    assert "not a hamburger drafter config" in error(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 5}))
    assert "num_layers must be 1 or 2" in error(folder)
    (folder / "config.json").write_text("{not json")
    assert "is not valid JSON" in error(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))
    assert "has shape" in error(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    assert "has no model.safetensors" in error(folder)


def test_base_embeddings_untied_and_tied(tiny_model, tmp_path):
    model, _ = load_base(tiny_model)
    embed, lm_head = load_base_embeddings(tiny_model)
    torch.testing.assert_close(embed, model.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(lm_head, model.get_output_embeddings().weight, rtol=0, atol=0)
    assert not torch.equal(embed, lm_head)  # the tiny model is untied
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({"model.embed_tokens.weight": embed.contiguous(), "model.norm.weight": torch.ones(256)},
              str(tied / "model.safetensors"))
    embed2, head2 = load_base_embeddings(tied)
    assert torch.equal(embed2, embed) and torch.equal(head2, embed)
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_base_embeddings(tmp_path)
