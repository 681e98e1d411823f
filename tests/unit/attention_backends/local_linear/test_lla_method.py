"""Local-linear attention as an output method of the registry: the op the engine adapters call is
``local_linear_paged`` with the layer's lambda (the model's own, per layer, before the config's), and a
bad lambda in a model's config names the key."""

from types import SimpleNamespace

import pytest
import torch

from afterburner.attention_backends import registry
from afterburner.attention_backends.local_linear.method import MODEL_LAMBDA_KEY, model_lambdas
from afterburner.attention_backends.local_linear.paged import local_linear_paged
from afterburner.plugins.config import LocalLinearSettings
from support.attention import make_batch


def _model(value, layers=2):
    return SimpleNamespace(num_hidden_layers=layers, **{MODEL_LAMBDA_KEY: value})


def test_the_registry_makes_the_paged_op_with_each_layers_lambda():
    batch = make_batch(0, seq_lens=[9, 17, 4], q_lens=[1, 5, 4], block_size=4, num_heads=4, num_kv_heads=2,
                       head_dim=8, dtype=torch.float32)
    settings = LocalLinearSettings(lam=3.0, cg_iters=8, jacobi=True)
    op = registry.make_output("local_linear", settings, model_config=_model([0.5, 2.0]))
    for layer, lam in enumerate([0.5, 2.0]):
        expected = local_linear_paged(*batch, scale=0.3, lam=lam, cg_max_iters=8, jacobi=True)
        assert torch.equal(op(layer, *batch, scale=0.3), expected)
    without = registry.make_output("local_linear", settings, model_config=SimpleNamespace(num_hidden_layers=2))
    assert torch.equal(without(1, *batch, scale=0.3), local_linear_paged(*batch, scale=0.3, lam=3.0, cg_max_iters=8,
                                                                         jacobi=True))


def test_the_kinds_of_method_do_not_overlap():
    assert "local_linear" in registry.OUTPUT_METHODS and not registry.OUTPUT_METHODS.keys() & registry.METHODS.keys()
    with pytest.raises(KeyError, match="computes no output of its own"):
        registry.make_output("sparse", LocalLinearSettings())


def test_model_lambdas():
    assert model_lambdas(SimpleNamespace()) is None
    assert model_lambdas(_model(2)) == 2.0
    assert model_lambdas(_model([1, 0.5])) == (1.0, 0.5)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "1.0", [1.0], [1.0, 0.0], []])
def test_a_bad_model_lambda_names_the_key(value):
    with pytest.raises(ValueError, match=f"{MODEL_LAMBDA_KEY} in the model's config.json must"):
        model_lambdas(_model(value))
