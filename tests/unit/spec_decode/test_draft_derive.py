"""Drafts derived from the tiny model: an early exit loads with its layer count and computes the target's
first layers + final norm + LM head; int4 fake-quantisation stays within half a step of its group scale."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from afterburner.plugins.cli import main
from afterburner.spec_decode.draft.derive import INT4_MAX, derive_draft, fake_quant_int4


@pytest.mark.parametrize("shape,group", [((8, 64), 32), ((5, 96), 32), ((3, 256), 128), ((7, 16), 16)])
@pytest.mark.parametrize("seed", range(3))
def test_int4_error_is_at_most_half_a_step(shape, group, seed):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
    quantised = fake_quant_int4(weight, group_size=group)
    groups, q_groups = weight.reshape(shape[0], -1, group), quantised.reshape(shape[0], -1, group)
    scale = groups.abs().amax(-1, keepdim=True) / INT4_MAX
    assert ((groups - q_groups).abs() <= scale / 2 + 1e-6).all()
    codes = q_groups / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= INT4_MAX + 1e-4
    assert torch.equal(fake_quant_int4(quantised, group_size=group), quantised)  # on the grid already
    with pytest.raises(ValueError, match="group size"):
        fake_quant_int4(weight[:, :-1], group_size=group)


def test_layer_draft_is_an_early_exit_of_the_target(tiny_model, tmp_path):
    out = derive_draft(tiny_model, tmp_path / "draft", layers=1)
    draft = AutoModelForCausalLM.from_pretrained(out).eval()
    target = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert draft.config.num_hidden_layers == 1 and len(draft.model.layers) == 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    with torch.inference_mode():
        hidden = target(ids, output_hidden_states=True).hidden_states[1]  # after the first decoder layer
        expected = target.lm_head(target.model.norm(hidden))
        torch.testing.assert_close(draft(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_int4_draft_quantises_the_decoder_linears_only(tiny_model, tmp_path):
    out = derive_draft(tiny_model, tmp_path / "draft", int4=True, group_size=32)
    draft = AutoModelForCausalLM.from_pretrained(out)
    target = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert draft.config.num_hidden_layers == target.config.num_hidden_layers
    target_weights = dict(target.named_parameters())
    for name, weight in draft.named_parameters():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(weight, fake_quant_int4(target_weights[name], group_size=32)), name
            assert not torch.equal(weight, target_weights[name]), name
        else:
            assert torch.equal(weight, target_weights[name]), name


def test_cli_writes_a_draft(tiny_model, tmp_path, capsys):
    out = tmp_path / "cli-draft"
    argv = ["models", "draft", "--from", str(tiny_model), "--layers", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "greedy agreement with the target:" in printed and str(out) in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert main(["models", "draft", "--from", str(tiny_model), "--layers", "9", "--out", str(out)]) == 2
    assert main(["models", "draft", "--from", str(tiny_model), "--out", str(out)]) == 2


def test_cached_drafts_are_derived_once_beside_the_models_cache_folder(tiny_model, tmp_path):
    import shutil

    from afterburner.spec_decode.draft.derive import cached_int4_draft, cached_layer_draft

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model, model)
    int4, early = cached_int4_draft(model), cached_layer_draft(model, 1)
    assert int4 == tmp_path / "drafts" / "tiny-int4" and early == tmp_path / "drafts" / "tiny-l1"
    config = json.loads((int4 / "config.json").read_text())
    assert "int4_group_size" in config["afterburner_draft"] and config["num_hidden_layers"] == 2
    assert json.loads((early / "config.json").read_text())["num_hidden_layers"] == 1
    stamp = (int4 / "config.json").stat().st_mtime_ns
    assert cached_int4_draft(model) == int4 and (int4 / "config.json").stat().st_mtime_ns == stamp  # reused
