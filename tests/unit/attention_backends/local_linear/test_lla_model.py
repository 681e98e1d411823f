"""The tiny Llama: LLA at a huge lambda is the softmax model, gradients through the solve are exact, and a
saved softmax folder is a LlamaForCausalLM with a working tokenizer."""

import pytest
import torch

from afterburner.attention_backends.local_linear.implicit import local_linear_implicit
from afterburner.attention_backends.local_linear.model import LAMBDA_KEY, LlamaShape, TinyLlama
from afterburner.attention_backends.local_linear.reference import local_linear_reference
from afterburner.attention_backends.local_linear.tasks import VOCAB, mqar_batch

SMALL = {"vocab_size": len(VOCAB), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def twin_models(lam):
    torch.manual_seed(0)
    softmax = TinyLlama(LlamaShape(**SMALL))
    lla = TinyLlama(LlamaShape(**SMALL, attention="local_linear", lla_lambda=lam))
    lla.load_state_dict(softmax.state_dict(), strict=False)
    return softmax, lla


def tokens():
    return mqar_batch(batch=3, pairs=5, generator=torch.Generator().manual_seed(0)).tokens


@pytest.mark.parametrize("grad", [False, True])  # blockwise (evaluation) and implicit (training) paths
def test_lla_at_huge_lambda_is_the_softmax_model(grad):
    softmax, lla = twin_models(1e8)
    with torch.set_grad_enabled(grad):
        expected, out = softmax(tokens()), lla(tokens())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_lla_at_small_lambda_differs():
    softmax, lla = twin_models(0.1)
    with torch.no_grad():
        assert (lla(tokens()) - softmax(tokens())).abs().max() > 1e-3


@pytest.mark.parametrize("jacobi", [False, True])
def test_implicit_gradients_match_the_reference(jacobi):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(9, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lam = torch.tensor([0.2, 0.5, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = local_linear_implicit(q, k, v, scale=6 ** -0.5, lam=lam, block_size=4, cg_atol=0, cg_rtol=0,
                                jacobi=jacobi)
    expected = local_linear_reference(q, k, v, scale=6 ** -0.5, lam=lam)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((out * weights).sum(), (q, k, v, lam))
    theirs = torch.autograd.grad((expected * weights).sum(), (q, k, v, lam))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_lambda_gets_a_gradient_and_is_exported():
    _, lla = twin_models(0.5)
    lla(tokens()).square().mean().backward()
    grads = [layer.self_attn.log_lambda.grad for layer in lla.model.layers]
    assert all(g is not None and torch.isfinite(g) and g != 0 for g in grads)
    config = lla.hf_config()
    assert config[LAMBDA_KEY] == pytest.approx([0.5, 0.5])
    assert not any(name.endswith("log_lambda") for name in lla.hf_state_dict())


def test_saved_softmax_folder_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from afterburner.plugins.cli.lla_export import load_folder, save_folder

    softmax, lla = twin_models(0.5)
    save_folder(softmax, tmp_path / "softmax", training={"shape": softmax.shape_dict()})
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "softmax", dtype=torch.float32).eval()
    batch = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits, softmax(batch), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "softmax")
    text = "k3 v17 k5 v2 k3"
    ids = tokenizer(text).input_ids
    assert ids == [VOCAB.index(w) for w in ["<s>", *text.split()]]
    assert tokenizer.decode(ids[1:]) == text
    save_folder(lla, tmp_path / "lla", training={"shape": lla.shape_dict()})
    loaded, _ = load_folder(tmp_path / "lla")
    assert loaded.lambdas() == pytest.approx([0.5, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), lla(batch))
