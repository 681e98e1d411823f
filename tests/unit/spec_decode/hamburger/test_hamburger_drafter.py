"""The micro-step drafter: shapes, the causal convention over micro-steps, draft lengths under the stop
head (none, all, rows stopping independently, equal to a per-row loop), and one-line config errors."""

import pytest
import torch

from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from support.hamburger import random_drafter, small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def inputs(config, rows: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, len(config.feature_layers), config.base_hidden_size, generator=g)
    return features, torch.randint(0, config.vocab_size, (rows, steps), generator=g)


def test_forward_shapes_and_the_causal_convention():
    config = small_config()
    drafter = random_drafter(config)
    features, tokens = inputs(config, 3, 4)
    logits, p_continue = drafter(features, tokens)
    assert logits.shape == (3, 4, config.vocab_size) and p_continue.shape == (3, 4)
    assert ((p_continue >= 0) & (p_continue <= 1)).all()
    for j in range(3):  # tokens after micro-step j change nothing up to j, and do change what follows
        changed = tokens.clone()
        changed[:, j + 1:] = (changed[:, j + 1:] + 7) % config.vocab_size
        logits2, p2 = drafter(features, changed)
        torch.testing.assert_close(logits2[:, :j + 1], logits[:, :j + 1])
        torch.testing.assert_close(p2[:, :j + 1], p_continue[:, :j + 1])
        assert not torch.allclose(logits2[:, j + 1:], logits[:, j + 1:])
    # micro-step j reads its own token and the features
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % config.vocab_size
    assert not torch.allclose(drafter(features, changed)[0][:, 0], logits[:, 0])
    assert not torch.allclose(drafter(features + 1, tokens)[0][:, 0], logits[:, 0])
    # a prefix of the micro-steps gives the same outputs as the full run
    torch.testing.assert_close(drafter(features, tokens[:, :2])[0], logits[:, :2])


def test_logits_go_through_the_base_lm_head():
    config = small_config(hidden_size=32)  # as wide as the base: no output projection
    drafter = random_drafter(config)
    features, tokens = inputs(config, 2, 3)
    states = drafter.step_states(features, tokens)
    torch.testing.assert_close(drafter(features, tokens)[0], states @ drafter.lm_head_weight.T)


def greedy_loop(drafter: MicroStepDrafter, features, last, max_tokens, threshold) -> list[int]:
    """One row, the definition: feed the argmax back, stop at the first p_continue below the threshold."""
    tokens, kept = last.reshape(1, 1), []
    for _ in range(max_tokens):
        logits, p = drafter(features[None], tokens)
        if threshold and p[0, -1] < threshold:
            break
        kept.append(int(logits[0, -1].argmax()))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return kept


def test_draft_lengths_follow_the_stop_head():
    config = small_config()
    drafter = random_drafter(config, stop_std=2.0)
    features, tokens = inputs(config, 8, 1)
    last = tokens[:, 0]
    full = drafter.draft(features, last, max_tokens=4, stop_threshold=None)
    assert [len(d) for d in full] == [4] * 8
    assert drafter.draft(features, last, max_tokens=4, stop_threshold=0.0) == full
    assert drafter.draft(features, last, max_tokens=3, stop_threshold=None) == [d[:3] for d in full]
    assert drafter.draft(features, last, max_tokens=4, stop_threshold=1.01) == [[]] * 8
    assert drafter.draft(features, last, max_tokens=0, stop_threshold=None) == [[]] * 8
    for row in range(8):
        assert full[row] == greedy_loop(drafter, features[row], last[row], 4, None)

    # a threshold in the middle of the P(continue) values met: rows stop at different micro-steps
    with torch.no_grad():
        _, p = drafter(features, torch.cat([last[:, None], torch.tensor(full)[:, :3]], 1))
    threshold = float(p.flatten().median())
    drafts = drafter.draft(features, last, max_tokens=4, stop_threshold=threshold)
    lengths = [len(d) for d in drafts]
    assert len(set(lengths)) >= 2 and max(lengths) > min(lengths) + 1, lengths
    for row in range(8):
        below = (p[row] < threshold).nonzero()
        assert lengths[row] == (int(below[0]) if len(below) else 4)
        assert drafts[row] == full[row][:lengths[row]]
        assert drafts[row] == greedy_loop(drafter, features[row], last[row], 4, threshold)

    # min_tokens: the first N drafts stay whatever the stop head says, the rule cuts from the next one
    for least in (1, 2):
        kept = drafter.draft(features, last, max_tokens=4, stop_threshold=threshold, min_tokens=least)
        for row in range(8):
            below = [j for j in (p[row] < threshold).nonzero().flatten().tolist() if j >= least]
            assert kept[row] == full[row][:below[0] if below else 4]
    assert drafter.draft(features, last, max_tokens=4, stop_threshold=1.01, min_tokens=1) == [d[:1] for d in full]


def test_an_engines_linear_drafts_what_torch_drafts():
    """attach_base(linear=...) as the engines call it: the LM head and fc_in's feature / token halves go
    through the given linear (counted), fixed once at attach time; drafts equal the torch path's."""
    config = small_config()
    drafter = random_drafter(config, stop_std=2.0)
    features, tokens = inputs(config, 6, 1)
    last = tokens[:, 0]
    expected = drafter.draft(features, last, max_tokens=4, stop_threshold=None)
    stopped = drafter.draft(features, last, max_tokens=4, stop_threshold=0.5)
    top = drafter.draft_topk(features, last, depth=3, topk=2)
    shapes = []

    def linear(weight):
        weight = weight.detach().clone()
        shapes.append(tuple(weight.shape))
        return lambda x: x @ weight.T

    drafter.attach_base(drafter.embed_weight, drafter.lm_head_weight, linear=linear)
    split = len(config.feature_layers) * config.base_hidden_size
    assert shapes == [(config.vocab_size, config.base_hidden_size), (config.hidden_size, split),
                      (config.hidden_size, config.base_hidden_size)]
    assert drafter.draft(features, last, max_tokens=4, stop_threshold=None) == expected
    assert drafter.draft(features, last, max_tokens=4, stop_threshold=0.5) == stopped
    assert torch.equal(drafter.draft_topk(features, last, depth=3, topk=2), top)
    assert any(len(d) < 4 for d in stopped)  # the stop head acted in the compared run


def test_draft_and_attach_errors():
    config = small_config()
    drafter = random_drafter(config)
    features, tokens = inputs(config, 1, 1)
    with pytest.raises(ValueError, match="max_tokens must be in 0..max_micro_steps=4"):
        drafter.draft(features, tokens[:, 0], max_tokens=5, stop_threshold=None)
    with pytest.raises(ValueError, match=r"features have shape \(1, 3, 32\)"):
        drafter(torch.randn(1, 3, 32), tokens)
    with pytest.raises(RuntimeError, match="attach_base"):
        MicroStepDrafter(config)(features, tokens)
    with pytest.raises(ValueError, match="embed_weight has shape"):
        MicroStepDrafter(config).attach_base(torch.randn(49, 32), torch.randn(50, 32))


@pytest.mark.parametrize(("change", "message"), [
    ({"num_layers": 3}, "num_layers must be 1 or 2"),
    ({"feature_layers": [0, 2]}, "feature_layers must be layer ids >= 1"),
    ({"feature_layers": [2, 2]}, "feature_layers has duplicates"),
    ({"feature_layers": 5}, "feature_layers must be a list"),
    ({"stop_threshold": 1.5}, "stop_threshold must be in"),
    ({"num_heads": 3}, "num_heads (3) must be a multiple of num_kv_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"max_micro_steps": "4"}, "max_micro_steps must be a positive integer"),
    ({"rope_theta": -1}, "rope_theta must be a positive number"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_config_errors_are_one_line_naming_the_field(change, message):
    data = {**small_config().to_dict(), **change}
    with pytest.raises(ValueError) as error:
        DrafterConfig.from_dict(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_round_trip_and_missing_field():
    config = small_config()
    assert DrafterConfig.from_dict(config.to_dict()) == config
    data = config.to_dict()
    del data["vocab_size"]
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        DrafterConfig.from_dict(data)
