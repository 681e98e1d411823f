"""Training: a few steps reduce the loss (softmax and LLA), and a resumed run equals one that never stopped."""

from dataclasses import replace

import pytest
import torch

from afterburner.attention_backends.local_linear.model import LlamaShape
from afterburner.attention_backends.local_linear.tasks import VOCAB
from afterburner.attention_backends.local_linear.training import (
    CheckpointMismatch,
    TrainConfig,
    loss_on,
    step_batch,
    train,
)

SHAPE = LlamaShape(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1)
CONFIG = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=5, mqar_pairs=(3, 4), regression_points=(4, 6))


@pytest.mark.parametrize("attention", ["softmax", "local_linear"])
def test_a_few_steps_reduce_the_loss(attention):
    shape = replace(SHAPE, attention=attention)
    untrained, _ = train(shape, replace(CONFIG, steps=0))
    model, state = train(shape, CONFIG)
    assert state.step == CONFIG.steps and len(state.losses) == CONFIG.steps
    held_out = [step_batch(replace(CONFIG, seed=99), s)[1] for s in range(4)]
    with torch.no_grad():
        before = sum(float(loss_on(untrained, b)) for b in held_out)
        after = sum(float(loss_on(model, b)) for b in held_out)
    assert after < before - 0.5


def test_resume_continues_the_same_run(tmp_path):
    shape = replace(SHAPE, attention="local_linear")
    config = replace(CONFIG, steps=6, save_every=3)
    straight, _ = train(shape, config)
    checkpoint = tmp_path / "checkpoint.pt"

    def interrupt_at_4(step, _loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # checkpoints at step 3 (save_every), then at 4 when interrupted
        train(shape, config, checkpoint=checkpoint, on_step=interrupt_at_4)
    resumed, state = train(shape, config, checkpoint=checkpoint, resume=True)
    assert state.resumed_from == 4 and state.step == 6 and len(state.losses) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_stop_at_then_resume_is_the_same_run(tmp_path):
    straight, _ = train(SHAPE, replace(CONFIG, steps=6))
    checkpoint = tmp_path / "checkpoint.pt"
    partial, state = train(SHAPE, replace(CONFIG, steps=6), checkpoint=checkpoint, stop_at=2)
    assert state.step == 2
    resumed, state = train(SHAPE, replace(CONFIG, steps=6), checkpoint=checkpoint, resume=True)
    assert state.resumed_from == 2 and state.step == 6
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resume_refuses_another_configuration(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    train(SHAPE, replace(CONFIG, steps=1), checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatch, match="lr"):
        train(SHAPE, replace(CONFIG, lr=5e-3), checkpoint=checkpoint, resume=True)
