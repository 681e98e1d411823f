"""Drafter self-distillation on the tiny model with a few hundred tokens: the base pass keeps the feature
layers' hidden states (and Medusa's pass is unchanged), targets and stop labels sit at the right positions,
training lowers the loss, a resumed run ends with the same weights, and the CLI writes a folder that loads."""

import json
import math

import pytest
import torch

from afterburner.plugins.cli import main
from afterburner.spec_decode.hamburger.checkpoint import load_drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.hamburger.train import (
    TrainConfig,
    base_norm_init,
    drafter_config_for,
    evaluate,
    micro_step_loss,
    residual_init,
    roc_auc,
    train_drafter,
)
from afterburner.spec_decode.medusa import distill_data
from afterburner.spec_decode.medusa.train import TrainError, positions, split_chunks

TOKENS = 400
LAYERS = (1,)
CONFIG = TrainConfig(steps=12, lr=3e-3, batch_size=64, seed=0, holdout=0.1, save_every=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def base(tiny_model, text_file, tmp_path_factory):
    model, tokenizer = distill_data.load_base(tiny_model)
    work = tmp_path_factory.mktemp("work")
    base, cached = distill_data.load_or_build(model, tokenizer, tiny_model, [text_file], work / "pass.pt",
                                              seq_len=64, max_tokens=TOKENS, progress=False, feature_layers=LAYERS)
    assert not cached and base.features.shape == (TOKENS, 1, model.config.hidden_size)
    plain, cached = distill_data.load_or_build(model, tokenizer, tiny_model, [text_file], work / "pass.pt",
                                               seq_len=64, max_tokens=TOKENS, progress=False)
    assert not cached and plain.features is None and plain.key != base.key  # Medusa's pass: no features
    torch.testing.assert_close(plain.hidden, base.hidden, rtol=0, atol=0)
    embed, lm_head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    return model, base, embed, lm_head


def test_features_are_the_hf_hidden_states(base):
    model, base, _, _ = base
    start, length = int(base.chunk_starts[1]), int(base.chunk_lengths[1])
    with torch.no_grad():
        out = model(input_ids=base.tokens[None, start:start + length], output_hidden_states=True)
    torch.testing.assert_close(base.features[start:start + length, 0], out.hidden_states[1][0], atol=1e-4, rtol=1e-4)


def test_targets_and_stop_labels_sit_at_the_right_positions(base):
    model, base, embed, lm_head = base
    torch.manual_seed(0)
    config = drafter_config_for(model.config, LAYERS)
    drafter = MicroStepDrafter(config).attach_base(embed, lm_head)
    start = int(base.chunk_starts[0])
    pos = torch.tensor([start + 3, start + 10])
    with torch.no_grad():
        out = micro_step_loss(drafter, base, pos, lm_head)
        logits = model(input_ids=base.tokens[None, start:start + 20]).logits[0]  # the base at each position
    for row, t in enumerate((3, 10)):
        tokens = base.tokens[start + t + 1:start + t + 5]  # x_{t+1} .. x_{t+4}
        drafted = drafter(base.features[start + t][None], tokens[None])[0][0].argmax(-1)
        base_top = logits[t + 1:t + 5].argmax(-1)  # the base's choice after x_{t+1+j}
        agree = drafted == base_top
        assert torch.equal(out["agree"][row], agree)
        assert torch.equal(out["label"][row], agree.long().cumprod(0).bool())
        greedy = torch.cat([torch.tensor([True]), tokens[1:] == base_top[:-1]]).long().cumprod(0).bool()
        assert torch.equal(out["valid"][row], greedy)
    # the KL targets: the base's log-distribution at t+1+j, averaged over the two positions
    kls = []
    for t in (3, 10):
        target = torch.log_softmax(logits[t + 1:t + 5], -1)
        with torch.no_grad():
            q = torch.log_softmax(drafter(base.features[start + t][None],
                                          base.tokens[None, start + t + 1:start + t + 5])[0][0], -1)
        kls.append((target.exp() * (target - q)).sum(-1))
    torch.testing.assert_close(out["kl"], (kls[0] + kls[1]) / 2, atol=1e-4, rtol=1e-4)


def test_norms_start_as_the_base_ones(base, tmp_path):
    model, base, embed, lm_head = base
    drafter_config = drafter_config_for(model.config, LAYERS)
    init = base_norm_init(model, drafter_config)
    layers = model.base_model.layers
    assert torch.equal(init["feature_norms.0.weight"], layers[1].input_layernorm.weight)  # hidden_states[1]
    assert torch.equal(init["embed_norm.weight"], layers[0].input_layernorm.weight)
    assert torch.equal(init["norm.weight"], model.base_model.norm.weight)
    start = train_drafter(base, embed, lm_head, drafter_config=drafter_config, config=CONFIG, work_dir=tmp_path,
                          init=init, progress=False, stop_after=0)
    for name, weight in init.items():
        assert torch.equal(start.drafter.state_dict()[name], weight), name


def test_residual_init_starts_at_the_logit_lens(base):
    model, base, embed, lm_head = base
    drafter_config = drafter_config_for(model.config, LAYERS)
    init = residual_init(drafter_config, base_norm_init(model, drafter_config), scale=0.0)
    drafter = MicroStepDrafter(drafter_config).attach_base(embed, lm_head)
    drafter.load_state_dict(init, strict=False)
    features, tokens = base.features[5:8], base.tokens[6:9, None].repeat(1, 3)
    lens = model.base_model.norm(features[:, -1])[:, None] @ lm_head.T  # the final norm + head on the stream
    with torch.no_grad():
        torch.testing.assert_close(drafter(features, tokens)[0], lens.expand(-1, 3, -1), atol=1e-4, rtol=1e-4)
    with pytest.raises(TrainError, match="as wide as the base"):
        residual_init(DrafterConfig(**{**drafter_config.to_dict(), "hidden_size": 64}), init)


def test_roc_auc():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert roc_auc(torch.tensor([0.5]), torch.tensor([1])) is None


def test_training_lowers_the_loss(base, tmp_path):
    model, base, embed, lm_head = base
    drafter_config = drafter_config_for(model.config, LAYERS)
    train_chunks, held = split_chunks(base, num_heads=4, holdout=CONFIG.holdout, seed=0)
    train_pos = positions(base, train_chunks, 4)
    config = TrainConfig(**{**CONFIG.__dict__, "steps": 40})
    result = train_drafter(base, embed, lm_head, drafter_config=drafter_config, config=config, work_dir=tmp_path,
                           progress=False)
    torch.manual_seed(0)  # the untrained drafter train_drafter started from
    untrained = MicroStepDrafter(drafter_config).attach_base(embed, lm_head)
    before = evaluate(untrained, base, train_pos, lm_head)
    after = evaluate(result.drafter, base, train_pos, lm_head)
    assert result.step == 40 and len(result.losses) == 40
    assert all(a < 0.8 * b for a, b in zip(after["kl"], before["kl"], strict=True)), (before["kl"], after["kl"])
    # the stop labels depend on the drafter's own argmax: compare stop heads on the trained trunk; the
    # trained one knows at least the labels' base rate (the random tiny model leaves little else to learn)
    rate = after["stop_label_rate"]
    assert 0 < rate < 1 and after["stop_bce"] < -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) + 0.01
    result.drafter.stop_head.load_state_dict(untrained.stop_head.state_dict())
    assert after["stop_bce"] < 0.97 * evaluate(result.drafter, base, train_pos, lm_head)["stop_bce"]
    assert result.after["positions"] == result.holdout_positions > 0


def test_resume_gives_the_same_weights_as_one_run(base, tmp_path):
    model, base, embed, lm_head = base
    drafter_config = drafter_config_for(model.config, LAYERS)
    kwargs = dict(drafter_config=drafter_config, config=CONFIG, progress=False)
    whole = train_drafter(base, embed, lm_head, work_dir=tmp_path / "whole", **kwargs)
    # killed after 6 steps: the last checkpoint is step 4 (save_every=4), so the resumed run redoes 4..5
    cut = train_drafter(base, embed, lm_head, work_dir=tmp_path / "cut", stop_after=6, **kwargs)
    assert cut.step == 6 and torch.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    resumed = train_drafter(base, embed, lm_head, work_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.resumed_from == 4 and resumed.step == whole.step == 12
    for (name, a), b in zip(whole.drafter.state_dict().items(), resumed.drafter.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(TrainError, match="other settings"):
        train_drafter(base, embed, lm_head, work_dir=tmp_path / "cut", resume=True, progress=False,
                      drafter_config=drafter_config, config=TrainConfig(**{**CONFIG.__dict__, "lr": 1e-3}))


def test_cli_trains_a_folder_that_loads_back(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "drafter"
    argv = ["train", "hamburger", "--base", str(tiny_model), "--data", str(text_file), "--out", str(out),
            "--max-tokens", "300", "--seq-len", "64", "--batch-size", "64", "--steps", "5", "--save-every", "3",
            "--threads", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "top-1 agreement" in first and "stop head" in first
    drafter = load_drafter(out)
    assert drafter.config.feature_layers == (1,) and drafter.config.hidden_size == 256  # as wide as the base
    saved = torch.load(out.with_name("drafter.train") / "checkpoint.pt")["drafter"]
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["tokens"] == 300 and training["steps"] == 5 and len(training["holdout"]["top1"]) == 4

    assert main([*argv, "--resume"]) == 0  # finished: reuses the base pass, trains no further
    again = capsys.readouterr().out
    assert "from the cache" in again and "resumed from step 5" in again


def test_bad_feature_layers_are_one_line(tiny_model, text_file, tmp_path, capsys):
    argv = ["train", "hamburger", "--base", str(tiny_model), "--data", str(text_file), "--out", str(tmp_path / "o")]
    assert main([*argv, "--feature-layers", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: --feature-layers [2]: the base has 2 "
                                                                "layers, allowed 1..1")
    with pytest.raises(SystemExit):
        main([*argv, "--feature-layers", "1,x"])
    assert "expected comma-separated layer ids" in capsys.readouterr().err
